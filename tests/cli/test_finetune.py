"""`afconvert finetune`: a run through torchrun (2 processes, gloo), killed then resumed or restarted, ends in the
state of an uninterrupted one and keeps the certificate; bad inputs are refused in one line and lose nothing; a
named teacher takes the student's input channels."""
import multiprocessing
import signal
import uuid
from pathlib import Path

import pytest
import torch
from conftest import kill_after

import afconvert
from afconvert.cli import main
from afconvert.train.finetune import TRAIN_FORMAT, register_step_hook

MODEL = ["test_convnext", "--no-pretrained", "--num-classes", "3"]
SMALL = ["--batch-size", "2", "--input-size", "32", "32", "--no-progress", "--aa", ""]


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


def test_torchrun_killed_then_resumed_or_restarted_ends_in_the_same_state(finetune_data, tmp_path, capfd):
    (tmp_path / "data").symlink_to(finetune_data)
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
def test_bad_inputs_are_one_line_and_lose_nothing(case, message, finetune_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["finetune", *MODEL, "--data", str(finetune_data), "--output", str(out), "--steps", "1", *SMALL]
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
