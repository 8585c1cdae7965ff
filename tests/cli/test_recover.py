"""``afconvert recover``: unlabelled folders and IDX folders in, a certified checkpoint out, fidelity printed
before and after, resumable after a kill; each bad input one line."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import afconvert
import afconvert.train.recover as recover_module
from afconvert.cli.recover import run
from afconvert.train.recover import RecoverError, fidelity, matched_units
from conftest import Killed, idx_folder

ARGS = ["--input-size", "32", "32", "--images", "16", "--held-out", "8", "--steps", "2", "--batch-size", "8",
        "--distill-steps", "3", "--calibration", "8"]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """24 random RGB images of 40 x 48, some in a sub-folder, no class layout."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    (root / "more").mkdir()
    for i in range(24):
        where = root / "more" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(where / f"{i}.png")
    return root


def _recover(capsys, source, data, out, *extra):
    rc = run([str(source), "--data", str(data), "--out", str(out), *ARGS, *extra])
    return rc, capsys.readouterr()


def test_recover_a_name_on_an_unlabelled_folder(unlabelled, tmp_path, capsys):
    rc, io = _recover(capsys, "test_efficientnet", unlabelled, tmp_path / "r.pt", "--no-pretrained")
    assert rc == 0, io.err
    line = next(s for s in io.out.splitlines() if s.startswith("fidelity to the source"))
    cos = [float(v) for v in line.split("feature cosine ")[1].split(",")[0].split(" -> ")]
    assert cos[1] > cos[0], line
    assert "verdict: certified" in io.out and "16 images to fit on, 8 held out; activations fitted on 8" in io.out
    assert "BatchNorm layers given the statistics of their inputs" in io.err
    model = afconvert.load(tmp_path / "r.pt")
    assert afconvert.audit(model, input_size=(32, 32)).certified
    assert not (tmp_path / "r.pt.partial").exists()


def test_recover_a_checkpoint_on_an_idx_folder(tmp_path, capsys):
    data = tmp_path / "idx"
    idx_folder(data, n=24)
    afconvert.save(afconvert.build("test_resnet", pretrained=False, input_size=(32, 32)).converted, tmp_path / "c.pt")
    rc, io = _recover(capsys, tmp_path / "c.pt", data, tmp_path / "r.pt")
    assert rc == 0, io.err
    assert "verdict: certified" in io.out
    assert afconvert.audit(afconvert.load(tmp_path / "r.pt"), input_size=(32, 32)).certified


def test_recover_resumes_after_a_kill(unlabelled, tmp_path, capsys, monkeypatch):
    _recover(capsys, "test_efficientnet", unlabelled, tmp_path / "whole.pt", "--no-pretrained")
    calls = []
    real = recover_module.reconstruct

    def dies_on_the_third(*args, **kwargs):
        calls.append(kwargs["units"])
        if len(calls) == 3:
            raise Killed(3)
        return real(*args, **kwargs)
    monkeypatch.setattr(recover_module, "reconstruct", dies_on_the_third)
    with pytest.raises(Killed):
        _recover(capsys, "test_efficientnet", unlabelled, tmp_path / "r.pt", "--no-pretrained")
    assert (tmp_path / "r.pt.partial").exists() and not (tmp_path / "r.pt").exists()
    monkeypatch.setattr(recover_module, "reconstruct", real)
    rc, io = _recover(capsys, "test_efficientnet", unlabelled, tmp_path / "r.pt", "--no-pretrained")
    assert rc == 0 and "resuming after 2 of" in io.err
    whole, resumed = afconvert.load(tmp_path / "whole.pt"), afconvert.load(tmp_path / "r.pt")
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b), k       # the same weights as a run that was never interrupted


def test_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, io = _recover(capsys, "test_efficientnet", tmp_path / "empty", tmp_path / "r.pt", "--no-pretrained")
    assert rc == 2 and "no images" in io.err and len(io.err.strip().splitlines()) == 1
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.png").write_bytes(b"not a png")
    rc, io = _recover(capsys, "test_efficientnet", junk, tmp_path / "r.pt", "--no-pretrained")
    assert rc == 2 and "none of the images" in io.err and len(io.err.strip().splitlines()) == 1
    assert not (tmp_path / "r.pt").exists()


def test_unmatched_blocks_are_refused_and_fidelity_of_a_model_to_itself_is_perfect():
    torch.manual_seed(0)
    resnet = timm.create_model("test_resnet", num_classes=5).eval()
    student = afconvert.convert(timm.create_model("test_efficientnet", num_classes=5), input_size=(32, 32))
    with pytest.raises(RecoverError, match="no block of the converted"):
        matched_units(student, timm.create_model("test_vit", num_classes=5, img_size=32))
    assert matched_units(student, timm.create_model("test_efficientnet", num_classes=5))
    same = fidelity(resnet, resnet, torch.randn(6, 3, 32, 32))
    assert same["cosine"] == pytest.approx(1.0) and same["agreement"] == 1.0
