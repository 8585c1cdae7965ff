"""afconvert.settings: one home for the process-wide switches; the environment read when first used, a bad
value refused in one line when used (not at import), setters and a context manager."""
import os
import subprocess
import sys

import pytest
import torch

from afconvert import settings
from afconvert.layers.spectral import ideal_resample


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in settings.ENVIRONMENT.values()}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True)


@pytest.fixture
def unread(monkeypatch):
    """The settings as in a fresh process: nothing used or set yet, no AFCONVERT_* variable."""
    monkeypatch.setattr(settings, "_VALUES", {})
    for env in settings.ENVIRONMENT.values():
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


def test_the_environment_is_read_when_a_setting_is_first_used(unread):
    assert (settings.resample_method(), settings.products()) == ("auto", "auto")
    unread.setattr(settings, "_VALUES", {})
    unread.setenv("AFCONVERT_RESAMPLE", "FFT")
    unread.setenv("AFCONVERT_PRODUCTS", "matmul")
    assert (settings.resample_method(), settings.products()) == ("fft", "matmul")
    unread.setenv("AFCONVERT_PRODUCTS", "onednn")       # read once: a later change of the variable is not seen
    assert settings.products() == "matmul"


def test_a_bad_environment_value_is_refused_in_one_line_when_used_not_at_import():
    code = ("import torch, afconvert.layers.spectral as sp\nprint('imported', flush=True)\n"
            "sp.ideal_resample(torch.randn(1, 1, 4, 4), (6, 6))")
    run = _run(code, AFCONVERT_PRODUCTS="fast")
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and run.stdout.strip() == "imported"
    assert "AFCONVERT_PRODUCTS='fast'" in last and "fix: one of auto, onednn, matmul" in last, last


def test_setters_and_the_context_manager():
    before = settings.products()
    with settings.using(resample="fft", products="matmul"):
        assert (settings.resample_method(), settings.products()) == ("fft", "matmul")
        with settings.using(resample="matmul"):
            assert settings.resample_method() == "matmul"
        assert settings.resample_method() == "fft"
    assert settings.products() == before
    for bad in (lambda: settings.set_products("fast"), lambda: settings.using(resample="fast").__enter__()):
        with pytest.raises(ValueError, match="unknown value 'fast'.*fix: one of"):
            bad()
    with pytest.raises(KeyError, match="unknown afconvert setting 'speed'"):
        settings.get("speed")
    assert settings.products() == before


def test_the_resample_setting_chooses_the_form():
    x = torch.randn(1, 2, 10, 14, dtype=torch.float64)
    with settings.using(resample="fft"):
        fft = ideal_resample(x, (5, 21))
    assert torch.equal(fft, ideal_resample(x, (5, 21), method="fft"))
    assert not torch.equal(fft, ideal_resample(x, (5, 21), method="matmul"))   # a different computation ...
    assert torch.allclose(fft, ideal_resample(x, (5, 21), method="matmul"), atol=1e-12)   # ... of one map


def test_a_bad_setting_reaches_the_command_line_as_itself(unread, tmp_path, capsys):
    """Not wrapped into another error (the converter's input-size check runs the model first)."""
    from afconvert.cli import main
    unread.setenv("AFCONVERT_PRODUCTS", "fast")
    assert main(["test_resnet", "--no-pretrained", "--input-size", "32", "32", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "AFCONVERT_PRODUCTS='fast'" in err and "input size" not in err, err
    assert not (tmp_path / "m.pt").exists()
