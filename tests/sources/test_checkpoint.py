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
    assert type(loaded) is type(converted) and loaded.afconvert_info.recipe == "afc"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_checkpoint_is_plain_data(converted, tmp_path):
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)
    ckpt = torch.load(path, weights_only=True)  # nothing to unpickle but tensors and builtins
    assert ckpt["format"] == "afconvert/2" and ckpt["source"]["name"] == "convnext_atto"
    assert ckpt["plan"] and all(e["class"].startswith("afconvert.layers.") for e in ckpt["plan"])
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


def test_load_applies_the_plan_without_converting(converted, tmp_path, monkeypatch):
    """No trace, fit or statistics at load: the plan rebuilds the replaced modules; logits bit for bit."""
    import afconvert.converter.engine as engine
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)

    def no_conversion(*a, **k):
        raise AssertionError("load traced the model (converted it again)")
    monkeypatch.setattr(engine, "_analyse", no_conversion)    # every conversion and audit starts there
    loaded = afconvert.load(path)
    monkeypatch.undo()
    x = random_input(2, 3, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    assert afconvert.audit(loaded, check=False).verdict.value == "exact"


def test_plan_rebuilds_only_afconvert_layers(converted, tmp_path):
    path = tmp_path / "m.pt"
    afconvert.save(converted, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["plan"][0]["class"] = "subprocess.Popen"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="refused to rebuild subprocess.Popen"):
        afconvert.load(path)


def test_format_1_checkpoints_still_load(tmp_path):
    """A format-1 checkpoint (no plan, no ``activation.normalize``, a ``norm.layernorm`` key) loads by converting
    again with its options: the same logits."""
    built = afconvert.build("convnext_atto", pretrained=False, num_classes=7,
                            options={"activation": {"normalize": "none"}})
    old_options = built.converted.afconvert_info.options
    del old_options["activation"]["normalize"]          # format 1 has no such option
    old_options["norm"]["layernorm"] = "chw"             # and has this key
    ckpt = {"format": "afconvert/1", "source": built.converted.afconvert_info.source,
            "recipe": {"name": "afc", "options": old_options}, "input_size": [64, 64], "in_chans": 3,
            "versions": {}, "state_dict": built.converted.state_dict()}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = afconvert.load(tmp_path / "old.pt")
    x = random_input(2, 3, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), built.converted.eval()(x))


@pytest.mark.parametrize("plan", [True, False])
def test_checkpoints_from_before_the_inband_scale_keep_the_l4_scale(tmp_path, plan):
    """A checkpoint whose recipe and plan name no [activation] ``scale`` loads computing the L4 scale of the
    2x grid, the scale it was trained with (from the plan, or converting again)."""
    built = afconvert.build("convnext_atto", pretrained=False, num_classes=7, options={"activation": {"scale": "l4"}})
    randomize_(built.converted, seed=2)
    afconvert.save(built.converted, tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    for opts in (ckpt["recipe"]["options"]["activation"], *[e["attrs"] for e in ckpt["plan"]]):
        opts.pop("scale", None)
    if not plan:
        ckpt["plan"] = None
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = afconvert.load(tmp_path / "old.pt")
    acts = [m for m in loaded.modules() if type(m).__name__ == "AliasFreePolyActivation"]
    assert acts and all(m.scale == "l4" for m in acts)
    x = random_input(2, 3, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), built.converted.eval()(x))


@pytest.mark.parametrize("recipe", ["afc-paper", "blurpool", "aps", "circular"])
def test_every_recipe_round_trips_through_its_plan(recipe, tmp_path):
    built = afconvert.build("resnet18", pretrained=False, num_classes=4, recipe=recipe,
                            options={"conv": {"blur_size": 5}} if recipe == "blurpool" else None)
    randomize_(built.converted, seed=1)
    afconvert.save(built.converted, tmp_path / "m.pt")
    loaded = afconvert.load(tmp_path / "m.pt")
    x = random_input(2, 3, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), built.converted.eval()(x))
    assert repr(loaded) == repr(built.converted)


def test_the_data_config_and_channels_survive_save_and_load(tmp_path):
    """A one-channel, 10-class model trained at 32 px loads preparing its inputs as it was trained."""
    from afconvert.data import data_config
    from afconvert.data import set_data_config
    built = afconvert.build("test_convnext", pretrained=False, num_classes=10, in_chans=1, input_size=(32, 32))
    set_data_config(built.converted, {"input_size": (1, 32, 32), "mean": (0.286,), "std": (0.353,),
                                      "interpolation": "bilinear", "crop_pct": 1.0})
    afconvert.save(built.converted, tmp_path / "m.pt")
    loaded = afconvert.load(tmp_path / "m.pt")
    cfg = data_config(loaded)
    assert cfg["input_size"] == (1, 32, 32) and cfg["mean"] == (0.286,) and cfg["std"] == (0.353,)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    with torch.no_grad():
        assert loaded(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
