"""`afconvert finetune`: distillation that runs, resumes exactly after a kill (torchrun, 2 processes,
gloo), keeps the certificate, and refuses bad inputs in one line."""
import multiprocessing
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Killed, idx_folder, kill_after
from PIL import Image

import afconvert
from afconvert.cli import main
from afconvert.train.distill import agreement, kd_loss
from afconvert.train.finetune import TRAIN_FORMAT, FinetuneConfig, finetune, register_step_hook

MODEL = ["test_convnext", "--no-pretrained", "--num-classes", "3"]
SMALL = ["--batch-size", "2", "--input-size", "32", "32", "--no-progress", "--aa", ""]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "data"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def test_kd_loss_leaves_out_non_finite_rows():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss, dropped = kd_loss(s, t, 2.0)
    assert dropped == 0 and loss > 0 and kd_loss(t, t)[0] < 1e-6
    s[1, 0] = float("inf")
    loss, dropped = kd_loss(s, t)
    assert dropped == 1 and torch.isfinite(loss)
    assert kd_loss(s[1:2], t[1:2]) == (None, 1)
    assert agreement(t, t).all() and not agreement(s, t)[1]


def _finetune_worker(kill_at: int, argv: list) -> int:
    """A torchrun worker, killed after update ``kill_at`` (0: never) in its first attempt (not in a restart)."""
    from afconvert.train.checkpointer import restart_count
    if kill_at and not restart_count():
        register_step_hook(kill_after(kill_at))
    torch.set_num_threads(1)
    return main(argv)


def _too_long(signum, frame):
    raise TimeoutError("the 2-process fine-tuning run took over 300 s")


def _torchrun(tmp_path, output, *extra, kill_at=0, max_restarts=0):
    """A 2-process run through torchrun's own launcher (elastic agent, c10d rendezvous on a free port, gloo),
    its workers forked from one fork server that imported afconvert's training stack once for all runs (each
    torchrun command starts three interpreters that each import torch and timm); every run starts from the
    same student checkpoint, whose teacher is rebuilt from it. Returns each rank's code: what ``main``
    returned, or a failed worker's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    argv = ["finetune", str(tmp_path / "student.pt"), "--data", str(tmp_path / "data"), "--output", str(output),
            "--steps", "5", "--checkpoint-every", "2", *SMALL, *extra]
    multiprocessing.get_context("forkserver").set_forkserver_preload(["afconvert.cli.finetune", "timm"])
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=max_restarts, start_method="forkserver",
                          monitor_interval=0.05)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                                                  signal.SIGALRM)}
    signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(300)           # a hung run fails the test (the agent then stops its workers)
    try:
        return elastic_launch(config, _finetune_worker)(kill_at, argv)
    except ChildFailedError as exc:
        return {rank: failure.exitcode for rank, failure in exc.failures.items()}
    finally:
        signal.alarm(0)
        for s, h in handlers.items():       # the agent installs its own; give pytest's back
            signal.signal(s, h)


def test_torchrun_killed_then_resumed_or_restarted_ends_in_the_same_state(data, tmp_path, capfd):
    (tmp_path / "data").symlink_to(data)
    afconvert.save(afconvert.build("test_convnext", pretrained=False, num_classes=3).converted, tmp_path / "student.pt")
    assert _torchrun(tmp_path, tmp_path / "whole") == {0: 0, 1: 0}
    killed = _torchrun(tmp_path, tmp_path / "killed", kill_at=3)
    assert set(killed.values()) == {17}                                             # killed after step 3 ...
    saved = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and not (tmp_path / "killed" / "final.pt").exists()   # ... last checkpoint: step 2
    capfd.readouterr()
    assert _torchrun(tmp_path, tmp_path / "killed", "--resume") == {0: 0, 1: 0}
    out = capfd.readouterr().out
    # torchrun --max-restarts 1: the restarted workers resume by themselves (starting afresh, they would
    # refuse the folder and return 2)
    assert _torchrun(tmp_path, tmp_path / "restarted", kill_at=3, max_restarts=1) == {0: 0, 1: 0}
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    for run in ("killed", "restarted"):
        b = torch.load(tmp_path / run / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 5 and a["world_size"] == b["world_size"] == 2
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) if torch.is_tensor(pa[k]) else pa[k] == pb[k] for k in pa)
        assert a["scheduler"] == b["scheduler"]
        log = (tmp_path / run / "log.csv").read_text().splitlines()
        assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4, 5]   # step 3 redone once, not logged twice
    model = afconvert.load(tmp_path / "killed" / "final.pt")
    assert "certified" in out and afconvert.audit(model, check=False).verdict.value == "exact"


def _pair():
    built = afconvert.build("test_convnext", pretrained=False, num_classes=3)
    return built.converted, built.source


def test_trains_keeps_certificate_and_skips_unreadable_images(data, tmp_path):
    broken = tmp_path / "data"
    import shutil
    shutil.copytree(data, broken)
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


@pytest.mark.parametrize("case,message", [
    ("missing", "no images"),
    ("empty", "no images"),
    ("other_run", "holds another run; fix: --resume"),
    ("restart_other_launch", "holds another run; fix: --resume"),
    ("no_checkpoint", "--resume: no checkpoint"),
    ("corrupt", "--resume: cannot read"),
    ("foreign", "is not an afconvert training checkpoint"),
    ("classes", "the student has 3 classes, the teacher 5"),
])
def test_bad_inputs_are_one_line_and_lose_nothing(case, message, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["finetune", *MODEL, "--data", str(data), "--output", str(out), "--steps", "1", *SMALL]
    if case == "missing":
        argv[argv.index("--data") + 1] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv[argv.index("--data") + 1] = str(tmp_path / "empty")
    elif case == "other_run":
        out.mkdir()
        (out / "log.csv").write_text("step\n1\n")
    elif case == "restart_other_launch":   # a torchrun restart resumes its own launch's run only
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        out.mkdir()
        torch.save({"format": TRAIN_FORMAT, "step": 1, "launch": "elsewhere:1:other"}, out / "last.pt")
    elif case == "no_checkpoint":
        argv.append("--resume")
    elif case in ("corrupt", "foreign"):
        out.mkdir()
        if case == "corrupt":
            (out / "last.pt").write_bytes(b"junk")
        else:
            torch.save({"state_dict": {}}, out / "last.pt")
        argv.append("--resume")
    elif case == "classes":
        argv += ["--teacher", "test_convnext", "--teacher-num-classes", "5", "--teacher-weights",
                 str(_teacher_weights(tmp_path))]
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "fix" in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before   # nothing written


def _teacher_weights(tmp_path: Path) -> Path:
    import timm
    path = tmp_path / "teacher5.pth"
    torch.save(timm.create_model("test_convnext", num_classes=5).state_dict(), path)
    return path


def test_gradient_accumulation_equals_the_larger_batch(data, tmp_path):
    """Two accumulated batches of 2 make the same update as one batch of 4 (the same 4 images, augmented
    alike: each sample's augmentation is seeded by its index). The weights are seeded, so the float32
    rounding compared below does not depend on test order within the worker."""
    torch.manual_seed(0)
    student, teacher = _pair()
    runs = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 2, 2)):
        s = __import__("copy").deepcopy(student)
        cfg = FinetuneConfig(data=str(data), output=str(tmp_path / name), steps=1, batch_size=bs, grad_accum_steps=accum,
                             input_size=(32, 32), progress=False, auto_augment=None, opt="sgd", lr=0.5)
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
], ids=["amp-mixup-task", "reconstruct-ema"])
def test_options_train_and_keep_the_certificate(extra, data, tmp_path, one_thread):
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    logged = []
    cfg = FinetuneConfig(data=str(data), output=str(tmp_path / "run"), steps=2, batch_size=4, input_size=(32, 32),
                         progress=False, auto_augment=None, lr=1e-3, **extra)
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


def test_a_run_killed_before_its_first_step_resumes(data, tmp_path):
    """The first checkpoint is written as the run starts: a kill at any moment leaves something to --resume."""
    student, teacher = _pair()
    cfg = FinetuneConfig(data=str(data), output=str(tmp_path / "run"), steps=3, batch_size=4, input_size=(32, 32),
                         progress=False, auto_augment=None, checkpoint_every=100)
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


def test_a_named_teacher_takes_the_students_channels(tmp_path):
    """--in-chans builds the named teacher with the student's input channels, so its weights file fits."""
    import timm

    from afconvert.cli.finetune import _models, _parser
    path = tmp_path / "teacher.pt"
    torch.save(timm.create_model("test_convnext", num_classes=3, in_chans=1).state_dict(), path)
    args = _parser().parse_args(["test_convnext", "--no-pretrained", "--num-classes", "3", "--in-chans", "1",
                                 "--teacher", "test_convnext", "--teacher-weights", str(path), "--data", "d",
                                 "--output", "o"])
    student, teacher = _models(args)
    with torch.no_grad():
        assert student(torch.zeros(1, 1, 32, 32)).shape == teacher(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
