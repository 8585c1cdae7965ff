"""Self-describing checkpoints: exact round trip, atomic writes, clear errors on bad files."""
import pytest
import timm
import torch
from conftest import randomize_

import afconvert
from afconvert.converter.certify import random_input
from afconvert.sources.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def converted():
    built = afconvert.build("convnext_atto", pretrained=False, num_classes=7)
    randomize_(built.converted, seed=3)
    return built.converted


def test_round_trip_reproduces_logits_exactly(converted, tmp_path):
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)
    loaded = afconvert.load(path)
    x = random_input(2, 3, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    assert type(loaded) is type(converted) and loaded.afconvert_info["recipe"] == "afc"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_checkpoint_is_plain_data(converted, tmp_path):
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)
    ckpt = torch.load(path, weights_only=True)  # nothing to unpickle but tensors and builtins
    assert ckpt["format"] == "afconvert/1" and ckpt["source"]["name"] == "convnext_atto"
    assert ckpt["source"]["kwargs"] == {"num_classes": 7} and "torch" in ckpt["versions"]


def test_corrupt_and_foreign_files(tmp_path, converted):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.*fix"):
        afconvert.load(bad)
    foreign = tmp_path / "sd.pt"
    torch.save(timm.create_model("convnext_atto").state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not an afconvert checkpoint.*--weights"):
        afconvert.load(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        afconvert.load(tmp_path / "missing.pt")


def test_save_refuses_unconverted_model(tmp_path):
    with pytest.raises(CheckpointError, match="not made by afconvert.convert"):
        afconvert.save(timm.create_model("convnext_atto"), tmp_path / "x.pt")


def test_failed_save_keeps_previous_file(converted, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        afconvert.save(converted, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]
