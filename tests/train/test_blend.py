"""Progressive replacement (``afconvert.train.blend``): at lambda = 1 the source network, at 0 exactly the
converted one; a blended network is never certified; a blend run ends certified and resumes exactly."""
import copy

import pytest
import torch
from conftest import Killed, idx_folder, kill_after

import afconvert
from afconvert.train.blend import Blend, blend, blend_weights, blended, set_blend, unblend
from afconvert.train.finetune import FinetuneConfig, finetune, register_step_hook


def _pair(name="resnet18", defer="none"):
    torch.manual_seed(0)
    built = afconvert.build(name, pretrained=False, num_classes=10, input_size=(32, 32),
                            options={"conv": {"defer": defer}})
    return built.converted.eval(), built.source.eval()


@pytest.mark.parametrize("order", ["all", "progressive"])
def test_schedules_start_at_one_end_at_zero_and_never_rise(order):
    n = 5
    steps = [blend_weights(p / 20, n, order) for p in range(21)]
    assert steps[0] == [1.0] * n and steps[-1] == [0.0] * n
    assert all(0 <= lam <= 1 for row in steps for lam in row)
    assert all(b <= a for r0, r1 in zip(steps, steps[1:]) for a, b in zip(r0, r1))
    if order == "progressive":      # front to back: layer 0 is done before layer n-1 starts
        half = blend_weights(0.5, 4, order)
        assert half == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown; fix"):
        blend_weights(0.5, 3, "random")


@pytest.mark.parametrize("defer", ["none", "all"])   # deferred: the source conv at stride 1, sampled after its ReLU
def test_lambda_one_is_the_source_and_zero_the_converted_network(defer):
    student, source = _pair(defer=defer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_converted, want_source = student(x), source(x)
        mixed = copy.deepcopy(student)
        paths = blend(mixed, source)
        assert len(paths) > 10 and len(blended(mixed)) == len(paths)
        assert torch.allclose(mixed(x), want_source, atol=1e-5)            # lambda = 1: the source network
        assert not torch.allclose(want_converted, want_source, atol=1e-2)   # (the two differ)
        set_blend(mixed, 1.0)
        assert torch.allclose(mixed(x), want_converted, atol=1e-5)         # lambda = 0: the converted one
        set_blend(mixed, 0.5)
        half = mixed(x)
        assert unblend(mixed) == len(paths) and not blended(mixed)
        assert torch.equal(mixed(x), want_converted)
    assert all(type(a) is type(b) for a, b in zip(mixed.modules(), student.modules()))
    assert not torch.allclose(half, want_converted, atol=1e-3)


def test_a_blended_network_is_not_certified_and_the_unblended_one_is():
    student, source = _pair()
    mixed = copy.deepcopy(student)
    blend(mixed, source)
    set_blend(mixed, 0.9)
    report = afconvert.audit(mixed, input_size=(32, 32), check=False)
    assert report.verdict.value != "exact"
    unblend(mixed)
    assert afconvert.audit(mixed, input_size=(32, 32), check=False).verdict.value == "exact"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend") / "idx"
    idx_folder(root, n=16)
    return root


RUN_MODEL = "test_resnet"       # timm's tiny ResNet for fine-tuning runs: the runs, not the network, are tested


def _cfg(data, out, **kw):
    return FinetuneConfig(data=str(data), output=str(out), steps=4, batch_size=4, input_size=(32, 32),
                          progress=False, auto_augment=None, lr=1e-3, blend=0.5, checkpoint_every=1,
                          val_data=str(data), val_split="test", **kw)


@pytest.mark.parametrize("order", ["all", "progressive"])
def test_a_blend_run_says_it_is_not_alias_free_then_ends_certified(order, data, tmp_path):
    student, source = _pair(RUN_MODEL)
    logged = []
    summary = finetune(student, source, _cfg(data, tmp_path / "run", blend_order=order), log=logged.append)
    assert any("NOT alias-free" in m for m in logged) and any("blend done at step 2" in m for m in logged)
    assert summary["verdict"].startswith("certified") and not blended(student)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    lam = [float(r.split(",")[rows[0].split(",").index("blend")]) for r in rows[1:]]
    assert lam[0] == 1.0 and lam[1] < 1.0 and lam[2:] == [0.0, 0.0]
    final = afconvert.load(tmp_path / "run" / "final.pt")
    assert not any(isinstance(m, Blend) for m in final.modules())
    assert afconvert.audit(final, input_size=(32, 32), check=False).verdict.value == "exact"
    val = (tmp_path / "run" / "val.csv").read_text().splitlines()
    assert val[0] == "step,epoch,top1" and [r.split(",")[0] for r in val[1:]] == ["0", "4"] and 0 <= summary["val_top1"] <= 100


def test_a_blend_run_killed_mid_blend_resumes_to_the_same_weights(data, tmp_path):
    student, source = _pair(RUN_MODEL)
    finetune(copy.deepcopy(student), source, _cfg(data, tmp_path / "whole"), log=lambda m: None)
    handle = register_step_hook(kill_after(1, hard=False))
    try:
        with pytest.raises(Killed):
            finetune(copy.deepcopy(student), source, _cfg(data, tmp_path / "killed"), log=lambda m: None)
    finally:
        handle.remove()
    resumed = copy.deepcopy(student)
    finetune(resumed, source, _cfg(data, tmp_path / "killed", resume=True), log=lambda m: None)
    whole = afconvert.load(tmp_path / "whole" / "final.pt").state_dict()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.items())


def test_blend_needs_a_teacher_and_a_fraction(data, tmp_path):
    student, source = _pair(RUN_MODEL)
    with pytest.raises(ValueError, match="--blend start from a teacher"):
        finetune(student, None, _cfg(data, tmp_path / "a"), log=lambda m: None)
    with pytest.raises(ValueError, match="fix: a fraction"):
        finetune(student, source, _cfg(data, tmp_path / "b", blend_order="sideways"), log=lambda m: None)
