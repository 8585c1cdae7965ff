"""From a model name (and weights) to a converted model: what the CLI and ``load`` both run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from afconvert.converter.engine import DEFAULT_PROBE_SIZE, back_by_measurement, convert, converted_numerics
from afconvert.converter.recipe import Recipe
from afconvert.data import load_images
from afconvert.sources import official_afc
from afconvert.sources.models import (
    ModelSourceError,
    SourceSpec,
    create_source_model,
    read_state_dict,
)

__all__ = ["Built", "build", "convert_source", "rebuild", "source_of"]


@dataclass
class Built:
    source: nn.Module            # the unconverted model, with its weights
    converted: nn.Module
    spec: SourceSpec
    recipe: str
    notes: list[str] = field(default_factory=list)


def _attach(converted: nn.Module, spec: SourceSpec) -> None:
    converted.afconvert_info.source = spec.to_dict()


def build(name: str, weights: str | Path | None = None, pretrained: bool = True, recipe: str = "afc",
          input_size: Sequence[int] | None = None, options: dict | None = None,
          calibration: "str | Path | torch.Tensor | None" = None, **model_kwargs) -> Built:
    """Create source model ``name`` with its weights and convert it.

    An official AFC checkpoint given as ``weights`` is recognised by its layout: the source is
    then timm's ConvNeXt of the same depths/dims, converted with ``afc-paper``, and the official
    weights are loaded into the converted model (strict)."""
    notes: list[str] = []
    if weights is not None and Path(weights).suffix != ".safetensors":
        raw = read_state_dict(weights)
        sd = official_afc.official_state_dict(raw)
        if sd is not None:
            arch = official_afc.architecture(sd)
            if not name.split(":")[-1].startswith("convnext"):
                raise ModelSourceError(f"{weights} is an official Alias-Free ConvNeXt checkpoint but the model is "
                                       f"'{name}'; fix: use a convnext model name (e.g. convnext_tiny)")
            kwargs = {**arch, **model_kwargs}
            source, spec = create_source_model("timm:convnext_tiny", pretrained=False, **kwargs)
            if recipe != "afc-paper":
                notes.append(f"official AFC checkpoint: recipe '{recipe}' replaced by 'afc-paper' (its configuration)")
            converted = convert(source, "afc-paper", input_size=input_size, options=options, check_numerics=False)
            mapped = official_afc.to_converted_timm(sd)
            try:
                converted.load_state_dict(mapped, strict=True)
            except RuntimeError as exc:
                raise ModelSourceError(f"official AFC checkpoint {weights} does not fit the paper configuration "
                                       f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc})"
                                       ) from exc
            report = converted.afconvert_report
            report.numerics = converted_numerics(converted)  # of the official weights
            info = converted.afconvert_info
            back_by_measurement(converted, report, info.input_size, info.in_chans)
            spec.weights = f"official AFC checkpoint {weights} ('model' entry)"
            notes.append(f"official AFC checkpoint recognised: depths {arch['depths']}, dims {arch['dims']}, "
                         f"{arch['num_classes']} classes")
            _attach(converted, spec)
            return Built(source, converted, spec, "afc-paper", notes)
    source, spec = create_source_model(name, weights=weights, pretrained=pretrained, **model_kwargs)
    if spec.name != name.split(":")[-1]:
        notes.append(f"'{name}' built as timm '{spec.name}' ({spec.weights})")
    images = calibration if not isinstance(calibration, (str, Path)) else None   # a tensor of images, or None
    if isinstance(calibration, (str, Path)):
        images, skipped = load_images(calibration, source, tuple(input_size or DEFAULT_PROBE_SIZE))
        if skipped:
            notes.append(f"{skipped} unreadable calibration image(s) under {calibration} skipped")
    converted = convert_source(source, spec, recipe, input_size=input_size, options=options, calibration=images)
    return Built(source, converted, spec, recipe, notes)


def convert_source(source: nn.Module, spec: SourceSpec, recipe: "str | Recipe", input_size: Sequence[int] | None = None,
                   options: dict | None = None, calibration=None) -> nn.Module:
    """``convert`` of a source model made by ``create_source_model``, which the converted model records (so its
    checkpoint rebuilds); ``calibration``: images (N, C, H, W) or None."""
    converted = convert(source, recipe, input_size=input_size, options=options, calibration=calibration)
    _attach(converted, spec)
    return converted


def rebuild(spec: SourceSpec, recipe: "str | Recipe", input_size: Sequence[int]) -> nn.Module:
    """The converted architecture of a saved model, with conversion-time weights (to be overwritten)."""
    source, _ = create_source_model(f"{spec.library}:{spec.name}", pretrained=False, **spec.kwargs)
    converted = convert(source, recipe, input_size=input_size, check_numerics=False)  # its weights are replaced
    _attach(converted, spec)
    return converted


def source_of(converted: nn.Module, path: str, fix: str) -> nn.Module:
    """The source model of a converted checkpoint (read from ``path``), rebuilt by name with the converted model's
    own kept weights: for a checkpoint written by conversion, the original. ``fix``: what the error suggests
    when the weights do not fit."""
    from afconvert.sources.models import create_source_model
    src = converted.afconvert_info.source or {}
    teacher, _ = create_source_model(f"{src.get('library', 'timm')}:{src.get('name')}", pretrained=False,
                                     **src.get("kwargs", {}))
    own, mine = teacher.state_dict(), converted.state_dict()
    bad = [k for k, v in own.items() if k not in mine or mine[k].shape != v.shape]
    if bad:
        raise ModelSourceError(f"cannot rebuild the source model from {path} ({len(bad)} of its weights, e.g. "
                               f"{bad[0]}, are not in the converted model); fix: {fix}")
    teacher.load_state_dict({k: mine[k] for k in own}, strict=True)
    return teacher.eval()
