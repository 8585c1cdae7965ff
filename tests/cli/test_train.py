"""`afconvert train`: the paper's path (a converted network trained from scratch on labels) in the fine-tuning
loop: it runs on an IDX folder, resumes a killed run to the very state of an uninterrupted one, and its result
loads with its data config and certifies; `--recipe none` is the unconverted baseline."""
import pytest
import torch
from conftest import Killed, idx_folder, kill_after

import afconvert
import afconvert.train.finetune as ft
from afconvert.cli import main
from afconvert.data import data_config


def _argv(data, out, *extra):
    return ["train", "test_convnext", "--data", str(data), "--output", str(out), "--num-classes", "10",
            "--in-chans", "1", "--input-size", "32", "32", "--steps", "4", "--batch-size", "4", "--aa", "",
            "--checkpoint-every", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "idx"
    idx_folder(root, n=16)
    return root


def test_trains_resumes_exactly_and_certifies(data, tmp_path, capsys):
    assert main(_argv(data, tmp_path / "whole")) == 0
    assert "certificate after training: certified" in capsys.readouterr().out
    handle = ft.register_step_hook(kill_after(2, hard=False))
    try:
        with pytest.raises(Killed):
            main(_argv(data, tmp_path / "killed"))
    finally:
        handle.remove()
    assert not (tmp_path / "killed" / "final.pt").exists()
    assert main(_argv(data, tmp_path / "killed", "--resume")) == 0
    whole, resumed = afconvert.load(tmp_path / "whole" / "final.pt"), afconvert.load(tmp_path / "killed" / "final.pt")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    def log(run):           # every column but the speed
        return [line.rsplit(",", 1)[0] for line in (tmp_path / run / "log.csv").read_text().splitlines()]
    assert log("killed") == log("whole") and len(log("whole")) == 5
    assert data_config(resumed)["input_size"] == (1, 32, 32)
    assert afconvert.audit(resumed, input_size=(32, 32)).verdict.value == "exact"


def test_recipe_none_is_the_baseline_and_unlabelled_data_is_refused(data, tmp_path, capsys):
    assert main(_argv(data, tmp_path / "base", "--recipe", "none")) == 0
    out = capsys.readouterr().out
    assert "certificate after training" in out and "certified: exactly" not in out
    base = afconvert.load(tmp_path / "base" / "final.pt")
    assert base.afconvert_info.recipe == "none" and not base.afconvert_info.replaced
    assert afconvert.audit(base, input_size=(32, 32)).verdict.value != "exact"
    plain = tmp_path / "plain"
    plain.mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("L", (28, 28), i * 40).save(plain / f"{i}.png")
    assert main(_argv(plain, tmp_path / "unlabelled")) == 2
    err = capsys.readouterr().err
    assert "needs labelled images" in err and "fix:" in err and len(err.strip().splitlines()) == 1
