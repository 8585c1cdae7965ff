"""Fine-tuning (afconvert.train.finetune, afconvert.train.distill): the distillation loss leaves out non-finite
rows; a run keeps the certificate and skips unreadable images, trains a one-channel model on an IDX folder,
accumulates gradients as one larger batch would, trains with its options, and resumes after a kill before its
first step."""
import pytest
import torch
from conftest import Killed, idx_folder, kill_after

import afconvert
from afconvert.train.distill import agreement, kd_loss
from afconvert.train.finetune import FinetuneConfig, finetune, register_step_hook


def test_kd_loss_leaves_out_non_finite_rows():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss, dropped = kd_loss(s, t, 2.0)
    assert dropped == 0 and loss > 0 and kd_loss(t, t)[0] < 1e-6
    s[1, 0] = float("inf")
    loss, dropped = kd_loss(s, t)
    assert dropped == 1 and torch.isfinite(loss)
    assert kd_loss(s[1:2], t[1:2]) == (None, 1)
    assert agreement(t, t).all() and not agreement(s, t)[1]


def _pair():
    built = afconvert.build("test_convnext", pretrained=False, num_classes=3)
    return built.converted, built.source


def test_trains_keeps_certificate_and_skips_unreadable_images(finetune_data, tmp_path):
    broken = tmp_path / "data"
    import shutil
    shutil.copytree(finetune_data, broken)
    (broken / "0" / "broken.png").write_bytes(b"not an image")
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = FinetuneConfig(data=str(broken), output=str(tmp_path / "run"), steps=3, batch_size=4, input_size=(32, 32),
                         progress=False, auto_augment=None, lr=1e-3)
    summary = finetune(student, teacher, cfg)
    assert summary["steps"] == 3 and summary["skipped_images"] >= 1
    assert summary["stable"] and summary["verdict"].startswith("certified")
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "final.pt").is_file()


def test_an_idx_folder_trains_a_one_channel_model(tmp_path):
    """Fashion-MNIST's format: an IDX pair per split, gray 28 x 28 images, read in place (no image files), for a
    model with one input channel; the converted student keeps its certificate."""
    idx_folder(tmp_path / "idx", n=12)
    built = afconvert.build("test_convnext", pretrained=False, num_classes=10, in_chans=1, input_size=(32, 32))
    cfg = FinetuneConfig(data=str(tmp_path / "idx"), output=str(tmp_path / "run"), steps=2, batch_size=4,
                         input_size=(32, 32), progress=False, auto_augment=None, lr=1e-3, task_loss_weight=0.5)
    summary = finetune(built.converted, built.source, cfg)
    assert summary["steps"] == 2 and summary["skipped_images"] == 0
    assert summary["stable"] and summary["verdict"].startswith("certified")
    from afconvert.data import data_config
    assert data_config(afconvert.load(summary["final"]))["input_size"] == (1, 32, 32)   # as it was trained


def test_gradient_accumulation_equals_the_larger_batch(finetune_data, tmp_path):
    """Two accumulated batches of 2 make the same update as one batch of 4 (the same 4 images, augmented
    alike: each sample's augmentation is seeded by its index). The weights are seeded, so the float32
    rounding compared below does not depend on test order within the worker."""
    torch.manual_seed(0)
    student, teacher = _pair()
    runs = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 2, 2)):
        s = __import__("copy").deepcopy(student)
        cfg = FinetuneConfig(data=str(finetune_data), output=str(tmp_path / name), steps=1, batch_size=bs,
                             grad_accum_steps=accum, input_size=(32, 32), progress=False, auto_augment=None, opt="sgd",
                             lr=0.5)
        finetune(s, teacher, cfg, log=lambda m: None)
        runs[name] = s.state_dict()
    moved = [k for k in runs["big"] if not torch.equal(runs["big"][k], student.state_dict()[k])]
    assert moved
    for k in runs["big"]:            # float32 rounding only: far below the update itself
        step = (runs["big"][k] - student.state_dict()[k]).abs().max()
        assert (runs["big"][k] - runs["accum"][k]).abs().max() <= 1e-4 * step + 1e-7, k


@pytest.mark.parametrize("extra", [
    dict(amp=True, amp_dtype="bfloat16", mixup=0.8, cutmix=1.0, task_loss_weight=0.5),
    dict(reconstruct=True, reconstruct_steps=3, reconstruct_batches=1, model_ema=True),
    dict(reconstruct=True, reconstruct_steps=3, reconstruct_batches=1, blend=0.5),
], ids=["amp-mixup-task", "reconstruct-ema", "reconstruct-blend"])
def test_options_train_and_keep_the_certificate(extra, finetune_data, tmp_path, one_thread):
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    logged = []
    cfg = FinetuneConfig(data=str(finetune_data), output=str(tmp_path / "run"), steps=2, batch_size=4,
                         input_size=(32, 32), progress=False, auto_augment=None, lr=1e-3, **extra)
    summary = finetune(student, teacher, cfg, log=logged.append)
    assert summary["steps"] == 2 and summary["stable"] and summary["verdict"].startswith("certified")
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(float(r.split(",")[2]) == float(r.split(",")[2]) for r in rows)   # finite loss
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["reconstructed"] == bool(extra.get("reconstruct"))
    if extra.get("reconstruct"):
        from afconvert.train.reconstruct import reconstruction_units
        assert sum(m.startswith("reconstruct ") for m in logged) == len(reconstruction_units(student)) > 10


def test_a_run_killed_before_its_first_step_resumes(finetune_data, tmp_path):
    """The first checkpoint is written as the run starts: a kill at any moment leaves something to --resume."""
    student, teacher = _pair()
    cfg = FinetuneConfig(data=str(finetune_data), output=str(tmp_path / "run"), steps=3, batch_size=4,
                         input_size=(32, 32), progress=False, auto_augment=None, checkpoint_every=100)
    handle = register_step_hook(kill_after(1, hard=False))
    try:
        with pytest.raises(Killed):
            finetune(student, teacher, cfg, log=lambda m: None)
    finally:
        handle.remove()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 0
    student, teacher = _pair()
    cfg.resume = True
    assert finetune(student, teacher, cfg, log=lambda m: None)["steps"] == 3
