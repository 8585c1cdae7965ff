"""Up-sampling.

Nearest or bilinear up-sampling by an integer factor f is zero-insertion followed by a short
interpolation kernel (box or triangle): the kernel passes part of the spectral images at
k +- N, so a fractional shift of the input is not a shift of the output. Ideal up-sampling
keeps exactly the input's band (|k| < N/2, the Nyquist bin split in half): exact. Only integer
scale factors convert; other sizes are reported.
"""
from __future__ import annotations

import torch.nn as nn

from afconvert.highrate import IdealUpsample
from afconvert.rule import Judgement, Rule, Site, Verdict

UPSAMPLERS = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


def _integer_factor(m: nn.Module) -> tuple[int, int] | None:
    f = m.scale_factor
    if f is None or m.size is not None:
        return None
    f = (f, f) if not isinstance(f, (tuple, list)) else tuple(f)
    return tuple(int(v) for v in f) if all(float(v).is_integer() and v >= 1 for v in f) else None


def _judge(site: Site, options: dict) -> Judgement:
    if isinstance(site.module, IdealUpsample):
        return Judgement(Verdict.EXACT, f"ideal up-sampling by {site.module.factor}")
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    return Judgement(Verdict.NOT, f"{site.module.mode} up-sampling leaves spectral images (aliases)")


def _convert(site: Site, options: dict):
    factor = _integer_factor(site.module) if not isinstance(site.module, IdealUpsample) else None
    if factor is None or not site.spatial or site.x is None or site.x.spatial_dims != (2, 3):
        return None
    return IdealUpsample(factor)


RULES = [Rule(name="upsample", family="upsample", targets=UPSAMPLERS + (IdealUpsample,), judge=_judge,
              convert=_convert)]
