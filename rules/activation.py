"""Pointwise activations.

A pointwise nonlinearity f applied to a signal band-limited to |k| < N/2 creates harmonics
above N/2 that fold back (alias). A degree-d polynomial creates harmonics only up to dN/2:
evaluated on the signal ideally up-sampled by u >= (d+1)/2, then ideally low-passed and brought
back to the input rate, it commutes with every circular shift (``AliasFreePolyActivation``).

Conversion: each activation on a spatial tensor becomes that polynomial, per channel, initialised
to the least-squares fit of the original activation over ``fit_range`` (the fit is exact for
nothing but polynomials, so the converted network needs fine-tuning). Activations on spatially
constant tensors (after global pooling, squeeze-excite gates) are already shift-invariant: kept.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import activations as timm_act

from afconvert.poly import AliasFreePolyActivation, LowpassPolyActivation, PolyActivation
from afconvert.rule import Judgement, Rule, Site, Verdict

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
    timm_act.GELU, timm_act.GELUTanh, timm_act.Swish, timm_act.Mish, timm_act.HardSwish, timm_act.HardSigmoid,
    timm_act.Sigmoid, timm_act.Tanh, timm_act.QuickGELU,
)


def _judge_activation(site: Site, options: dict) -> Judgement:
    act = site.module
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input: already shift-invariant")
    if isinstance(act, AliasFreePolyActivation):
        return Judgement(Verdict.EXACT, f"degree-{act.degree} polynomial at {act.up}x rate, ideal low-pass back")
    if isinstance(act, LowpassPolyActivation):
        return Judgement(Verdict.APPROX, "low-pass polynomial at the input rate: exact only before a coarse down-sampling")
    if isinstance(act, PolyActivation):
        return Judgement(Verdict.NOT, f"degree-{act.degree} polynomial at the input rate aliases its harmonics")
    return Judgement(Verdict.NOT, "pointwise nonlinearity creates harmonics above Nyquist")


def _convert_activation(site: Site, options: dict) -> nn.Module | None:
    act = site.module
    if not site.spatial or isinstance(act, PolyActivation):
        return None
    x = site.x
    if x is None or x.spatial_dims is None or x.channel_dim is None:
        return None  # the engine reports why (flattened or unknown layout)
    degree = int(options.get("degree", 2))
    rng = tuple(float(v) for v in options.get("fit_range", (-3.0, 3.0)))
    fn = act.eval()  # the module itself is the function to fit
    return AliasFreePolyActivation.fitted(
        fn, x.channels, degree, rng, in_scale=float(options.get("in_scale", 1.0)),
        out_scale=float(options.get("out_scale", 1.0)), train_scale=bool(options.get("train_scale", False)),
        channel_dim=x.channel_dim, spatial_dims=x.spatial_dims)


RULES = [
    Rule(name="activation", family="activation", targets=ACTIVATIONS + (PolyActivation, AliasFreePolyActivation,
                                                                          LowpassPolyActivation),
         judge=_judge_activation, convert=_convert_activation),
]
