"""Checkpoints of the official Alias-Free ConvNeXt code (hmichaeli/alias_free_convnets).

Its training script saves ``{"model": state_dict, "optimizer": ..., "epoch": ..., "scaler": ...,
"args": argparse.Namespace, "model_ema": ...}``. We read such files with ``weights_only=True``,
allow-listing ``argparse.Namespace`` only (no code is unpickled), recognise the layout by its
key names, and map the keys of its ``ConvNeXtAFC`` onto timm's ``ConvNeXt`` converted with the
``afc-paper`` recipe:

    downsample_layers.0.0.1.*             -> stem.0.*               (4x4 conv, circular pad (1,2,1,2))
    downsample_layers.0.1.gamma           -> stem.0.pre_down.gamma  (residual stem activation)
    downsample_layers.0.1.residual.0.*    -> stem.0.pre_down.act.*  (coef (C,3,1,1) -> (C,3))
    downsample_layers.0.3.*               -> stem.1.*               (CHW LayerNorm)
    downsample_layers.i.0.*, .i.1.1.*     -> stages.i.downsample.0.*, .1.*
    stages.i.j.dwconv.1.*                 -> stages.i.blocks.j.conv_dw.*
    stages.i.j.norm.*, .gamma             -> stages.i.blocks.j.norm.*, .gamma
    stages.i.j.mlp.pwconv1/act/pwconv2.*  -> stages.i.blocks.j.mlp.fc1/act/fc2.*
    norm.*, head.*                        -> head.norm.*, head.fc.*

The official filter masks (``*.rect`` buffers, cached at its first forward) are dropped: ours
are built per input shape.
"""
from __future__ import annotations

import argparse
import contextlib
import re

import torch

__all__ = ["safe_globals", "is_official_checkpoint", "official_state_dict", "to_converted_timm", "architecture"]

_ALLOWED = [argparse.Namespace]


@contextlib.contextmanager
def safe_globals():
    """Allow ``argparse.Namespace`` (the official checkpoints' ``args``) under ``weights_only=True``."""
    with torch.serialization.safe_globals(_ALLOWED):
        yield


def official_state_dict(obj) -> dict | None:
    """The model state_dict of an official AFC checkpoint (``obj['model']``), or None if not one."""
    sd = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if isinstance(sd, dict) and "downsample_layers.0.0.1.weight" in sd and any(k.startswith("stages.0.0.") for k in sd):
        return sd
    return None


def is_official_checkpoint(obj) -> bool:
    return official_state_dict(obj) is not None


def architecture(sd: dict) -> dict:
    """timm ConvNeXt kwargs (depths, dims, num_classes) read off the state_dict's shapes."""
    depths, dims = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        dims.append(int(sd[f"stages.{i}.0.norm.weight"].shape[0]) if blocks else 0)
    return {"depths": tuple(depths), "dims": tuple(dims), "num_classes": int(sd["head.weight"].shape[0]),
            "in_chans": int(sd["downsample_layers.0.0.1.weight"].shape[1])}


_RULES = [
    (r"downsample_layers\.0\.0\.1\.(weight|bias)", r"stem.0.\1"),
    (r"downsample_layers\.0\.1\.gamma", r"stem.0.pre_down.gamma"),
    (r"downsample_layers\.0\.1\.residual\.0\.(coef|in_scale|out_scale)", r"stem.0.pre_down.act.\1"),
    (r"downsample_layers\.0\.3\.(weight|bias)", r"stem.1.\1"),
    (r"downsample_layers\.(\d)\.0\.(weight|bias)", r"stages.\1.downsample.0.\2"),
    (r"downsample_layers\.(\d)\.1\.1\.(weight|bias)", r"stages.\1.downsample.1.\2"),
    (r"stages\.(\d)\.(\d+)\.dwconv\.1\.(weight|bias)", r"stages.\1.blocks.\2.conv_dw.\3"),
    (r"stages\.(\d)\.(\d+)\.norm\.(weight|bias)", r"stages.\1.blocks.\2.norm.\3"),
    (r"stages\.(\d)\.(\d+)\.gamma", r"stages.\1.blocks.\2.gamma"),
    (r"stages\.(\d)\.(\d+)\.mlp\.pwconv1\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (r"stages\.(\d)\.(\d+)\.mlp\.pwconv2\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (r"stages\.(\d)\.(\d+)\.mlp\.act\.(coef|in_scale|out_scale)", r"stages.\1.blocks.\2.mlp.act.\3"),
    (r"norm\.(weight|bias)", r"head.norm.\1"),
    (r"head\.(weight|bias)", r"head.fc.\1"),
]
_DROPPED = re.compile(r".*\.rect$")


def to_converted_timm(sd: dict) -> dict:
    """Rename an official ConvNeXtAFC state_dict onto timm ConvNeXt + ``afc-paper`` keys.

    Raises ValueError naming the first key no rule maps (another configuration of the official
    model, e.g. a GELU or BlurPool variant, which the paper recipe does not describe)."""
    out = {}
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        for pattern, repl in _RULES:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, repl, key)
                if new.endswith(".coef") and value.ndim == 4:  # (C, deg+1, 1, 1) -> (C, deg+1)
                    value = value.reshape(value.shape[0], value.shape[1])
                out[new] = value
                break
        else:
            raise ValueError(f"official AFC checkpoint key '{key}' has no counterpart in the paper configuration "
                             f"(afc-paper recipe); fix: convert a checkpoint trained with the paper's ConvNeXt-AFC "
                             f"settings")
    return out
