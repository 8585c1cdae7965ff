"""Up-sampling (and any resizing by ``nn.Upsample`` / ``F.interpolate``).

Nearest or bilinear up-sampling by an integer factor f is zero-insertion followed by a short
interpolation kernel (box or triangle): the kernel passes part of the spectral images at
k +- N, so a fractional shift of the input is not a shift of the output. Ideal up-sampling
keeps exactly the input's band (|k| < N/2, the Nyquist bin split in half): exact. Integer factors
become ``IdealUpsample``; a given size, a non-integer factor, or a size computed in the graph (an FPN's
``F.interpolate(x, size=skip.shape[-2:])``) become ``IdealResize`` to the same output size, which moves
the output by d H_out / H for an input shift d, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from afconvert.converter import rule
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.resample import IdealResize, IdealUpsample

FAMILY = "upsample"


@dataclass(frozen=True)
class Options(rule.Options):
    """[upsample]"""

    replace: str = "ideal"          # "ideal": ideal up-sampling by the integer factor; "keep"


UPSAMPLERS = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


_INTERPOLATE_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _upsampler_of(site: Site) -> nn.Module | None:
    """The site's module, or an ``nn.Upsample`` built from an ``F.interpolate`` call's constant arguments."""
    if site.module is not None:
        return site.module
    params = site.call_args(_INTERPOLATE_ARGS)
    if params is None:
        return None
    return nn.Upsample(size=params.get("size"), scale_factor=params.get("scale_factor"),
                       mode=params.get("mode", "nearest"))


def _integer_factor(m: nn.Module) -> tuple[int, int] | None:
    f = m.scale_factor
    if f is None or m.size is not None:
        return None
    f = (f, f) if not isinstance(f, (tuple, list)) else tuple(f)
    return tuple(int(v) for v in f) if all(float(v).is_integer() and v >= 1 for v in f) else None


def _judge(site: Site, options: Options) -> Judgement:
    up = _upsampler_of(site)
    if isinstance(up, IdealUpsample):
        return Judgement(Verdict.EXACT, f"ideal up-sampling by {up.factor}")
    if isinstance(up, IdealResize):
        return Judgement(Verdict.EXACT, "ideal resampling to the output size")
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    mode = up.mode if up is not None else "computed-size"
    return Judgement(Verdict.NOT, f"{mode} resampling leaves spectral images (aliases)")


def _ideal(site: Site, options: Options):
    up = _upsampler_of(site)
    if isinstance(up, (IdealUpsample, IdealResize)) or not site.spatial or site.x is None \
            or site.x.spatial_dims != (2, 3):
        return None
    if up is None:                  # F.interpolate with arguments computed in the graph: given at each call
        return IdealResize()
    factor = _integer_factor(up)
    return IdealUpsample(factor) if factor is not None else IdealResize(up.size, up.scale_factor)


RULES = [Rule(name="upsample", family=FAMILY, targets=UPSAMPLERS + (F.interpolate, IdealUpsample, IdealResize), judge=_judge,
              strategies={"ideal": _ideal})]
