"""The one answer to "is this argument a checkpoint or a model name?", for every command.

An existing file is an afconvert checkpoint, loaded as saved (``checkpoint.load``). An argument that looks
like a path but is not a file is an error that says so. Anything else is a model name (``timm`` or
``torchvision:NAME``), checked against the libraries' registries (close names suggested), then built with
its weights: as it is (``recipe=None``: the source model) or converted (``pipeline.build``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:               # nothing here imports torch before the name is checked: a typo answers at once
    import torch.nn as nn

__all__ = ["Resolved", "resolve", "looks_like_path"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class Resolved:
    model: nn.Module                # the checkpoint's model, the source model, or the converted one
    source: nn.Module | None        # for a name converted here: the unconverted model with the same weights
    checkpoint: bool                # the argument was an afconvert checkpoint
    description: str                # where it came from, for the user


def looks_like_path(arg: str) -> bool:
    return os.sep in arg or "/" in arg or Path(arg).suffix in _CHECKPOINT_SUFFIXES


def resolve(arg: str, weights: str | None = None, pretrained: bool = True, recipe: str | None = None,
            **build_kwargs) -> Resolved:
    """The model ``arg`` names. ``recipe``: convert a model given by name with it (``build_kwargs`` go to
    ``pipeline.build``: input_size, calibration, options, timm arguments), or None to return the source model
    (``build_kwargs``: timm arguments)."""
    from afconvert.sources.names import ModelSourceError, check_name
    if Path(arg).is_file():
        from afconvert.sources.checkpoint import load
        model = load(arg)
        info = model.afconvert_info
        src = info.source or {}
        return Resolved(model, None, True, f"afconvert checkpoint: {src.get('library', 'timm')}:"
                        f"{src.get('name', '?')} converted with '{info.recipe}', weights {src.get('weights', '?')}")
    if looks_like_path(arg):
        raise ModelSourceError(f"checkpoint not found: {arg}; fix: check the path (or give a model name such as "
                               f"convnext_tiny)")
    check_name(arg)
    if recipe is None:
        from afconvert.sources.models import create_source_model
        model, spec = create_source_model(arg, weights=weights, pretrained=pretrained, **build_kwargs)
        return Resolved(model, None, False, f"{spec.library}:{spec.name}, weights {spec.weights}")
    from afconvert.sources.pipeline import build
    built = build(arg, weights=weights, pretrained=pretrained, recipe=recipe, **build_kwargs)
    return Resolved(built.converted, built.source, False, f"{built.spec.library}:{built.spec.name} converted with "
                    f"'{built.recipe}', weights {built.spec.weights}")
