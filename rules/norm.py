"""Normalisations.

* Per-pixel LayerNorm (over channels, at each pixel) divides every pixel by its own standard
  deviation: a pointwise nonlinearity that aliases. Alias-free form (the paper's "CHW2"): the
  per-pixel channel mean (linear, pointwise) and one standard deviation per sample over C, H, W
  (shift-invariant by Parseval): y = w (x - mean_C x) / sqrt(mean_CHW (x - mean_C x)^2 + eps) + b.
  The weights are kept.
* BatchNorm at eval is a per-channel affine map (exact); in training its statistics are taken
  over N, H, W (shift-invariant). GroupNorm's statistics are over (C/G, H, W): invariant. Kept.
* Any norm of a spatially constant tensor (a head after global pooling) is invariant: kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

from afconvert.converter import rule
from afconvert.converter.calibrate import calibration_batches, recalibrate_batchnorm
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.norm import AliasFreeLayerNorm

FAMILY = "norm"


@dataclass(frozen=True)
class Options(rule.Options):
    """[norm]"""

    replace: str = "chw"            # per-pixel LayerNorm -> mean over C, variance over C,H,W; "keep"
    recalibrate: bool = False       # re-estimate BatchNorm statistics for the converted network


LAYERNORMS = (nn.LayerNorm, LayerNorm, LayerNorm2d, TorchvisionLayerNorm2d)
CHANNELS_FIRST = (LayerNorm2d, TorchvisionLayerNorm2d)


def _normalised_dim(site: Site) -> int | None:
    """The dim a LayerNorm normalises: 1 for LayerNorm2d (channels first), the last dim otherwise."""
    if site.x is None:
        return None
    return 1 if isinstance(site.module, CHANNELS_FIRST) else len(site.x.shape) - 1


def _judge_layernorm(site: Site, options: Options) -> Judgement:
    if isinstance(site.module, AliasFreeLayerNorm):
        return Judgement(Verdict.EXACT, "mean over C, variance over C,H,W")
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input: already shift-invariant")
    x, dim = site.x, _normalised_dim(site)
    shape = getattr(site.module, "normalized_shape", None)
    dims = range(len(x.roles) - len(shape), len(x.roles)) if x is not None and shape is not None and dim != 1 else \
        [dim] if dim is not None else []
    if x is None or any(x.roles[d] for d in dims):
        return Judgement(Verdict.NOT, "normalises over a spatial dim with a weight per position: not "
                                      "shift-equivariant")
    return Judgement(Verdict.INTEGER, "per-pixel normalisation divides by a per-pixel statistic (pointwise: exact "
                                      "for integer shifts only)")


def _chw(site: Site, options: Options) -> nn.Module | None:
    if not site.spatial or isinstance(site.module, AliasFreeLayerNorm):
        return None
    x = site.x
    if x is None or x.spatial_dims is None or x.channel_dim is None or _normalised_dim(site) != x.channel_dim:
        return None
    return AliasFreeLayerNorm.from_layernorm(site.module, x.channel_dim, x.spatial_dims)


def _judge_kept(site: Site, options: Options) -> Judgement:
    x = site.x
    if x is not None and len(x.roles) > 1 and x.roles[1]:
        return Judgement(Verdict.NOT, f"its channel dim (dim 1) is spatial ({x.roles[1]}): a statistic or affine "
                                      f"weight per position, not shift-equivariant")
    return Judgement(Verdict.EXACT, "statistics over whole maps (or per-channel affine at eval): shift-invariant")


RULES = [
    Rule(name="layernorm", family=FAMILY, targets=LAYERNORMS + (AliasFreeLayerNorm,),
         judge=_judge_layernorm, strategies={"chw": _chw}),
    Rule(name="batchnorm", family=FAMILY, targets=(nn.BatchNorm2d, nn.GroupNorm, F.batch_norm, F.group_norm),
         judge=_judge_kept),
]


def after_conversion(model: nn.Module, options: Options, calibration: torch.Tensor | None,
                     input_size: Sequence[int], in_chans: int) -> list[str]:
    """With ``recalibrate``: re-estimate the converted model's BatchNorm statistics (on the calibration
    images, else on noise at ``input_size``). Returns notes for the report."""
    if not options.recalibrate:
        return []
    count = recalibrate_batchnorm(model, calibration_batches(calibration, input_size, in_chans))
    if not count:
        return []
    source = f"{len(calibration)} calibration images" if calibration is not None else \
        f"random inputs at {input_size[0]}x{input_size[1]} (pass calibration images, --calibration DIR, for real " \
        f"statistics)"
    return [f"{count} BatchNorm layers re-estimated for the converted activations on {source}"]
