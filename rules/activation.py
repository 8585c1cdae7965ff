"""Pointwise activations.

A pointwise nonlinearity f applied to a signal band-limited to |k| < N/2 creates harmonics
above N/2 that fold back (alias). A degree-d polynomial creates harmonics only up to dN/2:
evaluated on the signal ideally up-sampled by u >= (d+1)/2, then ideally low-passed and brought
back to the input rate, it commutes with every circular shift (``AliasFreePolyActivation``).

Conversion: each activation on a spatial tensor becomes that polynomial, per channel, initialised
to the least-squares fit of the original activation over ``fit_range``, or, given calibration
data, per channel by least squares on every measured input of it (``PolyFit``; the fit is exact
for nothing but polynomials, so the converted network needs fine-tuning). Activations on spatially
constant tensors (after global pooling, squeeze-excite gates) are already shift-invariant: kept.

``normalize = "channel"`` (recipe ``afc``) makes each polynomial scale-equivariant, y = s q(x / s)
with s the per-sample, per-channel L4 norm of its input map (``l4_scale``): like ReLU, its output scales linearly
with its input, so stacks of them stay bounded at every input size and scale (a plain quadratic
squares the scale at each layer, and deep BatchNorm networks overflow).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import activations as timm_act

from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.poly import (
    AliasFreePolyActivation,
    LowpassPolyActivation,
    PolyActivation,
    upsampling_factor,
)
from afconvert.layers.resample import (
    DownsampledLinear,
    HighRatePolyActivation,
    UpsampledLinear,
)

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
    timm_act.GELU, timm_act.GELUTanh, timm_act.Swish, timm_act.Mish, timm_act.HardSwish, timm_act.HardSigmoid,
    timm_act.Sigmoid, timm_act.Tanh, timm_act.QuickGELU,
)


# functional forms: torch / F functions and Tensor methods (x.relu())
FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.leaky_relu, F.softplus, F.selu, F.celu,
             F.hardsigmoid, F.hardtanh, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh)
METHODS = ("relu", "relu_", "sigmoid", "tanh")


def _function_of(site: Site):
    """The activation as a function of its first input: the module, or the call with its constant arguments."""
    node = site.node
    if site.module is not None:
        return site.module.eval()
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
        return None  # a parameter that is itself computed: not a fixed function
    kwargs.pop("inplace", None)
    if node.op == "call_method":
        return lambda t: getattr(t, node.target.rstrip("_"))(*rest, **kwargs)
    return lambda t: node.target(t, *[a for a in rest if not isinstance(a, bool)], **kwargs)


# pointwise modules that may stand between an activation and the next Linear (timm's Mlp: drop1, norm)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def _linear_neighbours(site: Site) -> tuple[fx.Node, fx.Node] | None:
    """(fc1, fc2) call_module nodes when the site is fc1 -> act -> [identity/dropout] -> fc2, each
    used once, so the pair can carry the up- and down-sampling."""
    node = site.node
    modules = dict(node.graph.owning_module.named_modules())
    before = node.args[0] if node.args else None
    if not (isinstance(before, fx.Node) and before.op == "call_module" and len(before.users) == 1):
        return None
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_module" or len(nxt.args) != 1:
            return None
        if isinstance(modules[nxt.target], _PASS_THROUGH):
            cur = nxt
            continue
        return (before, nxt) if isinstance(modules[before.target], nn.Linear) and \
            isinstance(modules[nxt.target], nn.Linear) else None
    return None


def _judge_high_rate(site: Site, act: HighRatePolyActivation) -> Judgement:
    pair = _linear_neighbours(site)
    if pair is not None:
        modules = dict(site.node.graph.owning_module.named_modules())
        up, down = modules[pair[0].target], modules[pair[1].target]
        if isinstance(up, UpsampledLinear) and isinstance(down, DownsampledLinear) and \
                up.factor == down.factor >= upsampling_factor(act.degree):
            return Judgement(Verdict.EXACT, f"degree-{act.degree} polynomial between ideal {up.factor}x up-sampling "
                                            f"({pair[0].target}) and down-sampling ({pair[1].target})")
    return Judgement(Verdict.NOT, "high-rate polynomial without its up-/down-sampling neighbours")


def _judge_activation(site: Site, options: dict) -> Judgement:
    act = site.module
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input: already shift-invariant")
    if isinstance(act, HighRatePolyActivation):
        return _judge_high_rate(site, act)
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
    fn, x = _function_of(site), site.x
    if fn is None or x is None or x.spatial_dims is None or x.channel_dim is None:
        return None  # kept, and judged: not alias-free (computed arguments, flattened or unknown layout)
    degree = int(options.get("degree", 2))
    rng = tuple(float(v) for v in options.get("fit_range", (-3.0, 3.0)))
    kwargs = dict(in_scale=float(options.get("in_scale", 1.0)), out_scale=float(options.get("out_scale", 1.0)),
                  train_scale=bool(options.get("train_scale", False)), channel_dim=x.channel_dim,
                  normalize=str(options.get("normalize", "none")), spatial_dims=x.spatial_dims,
                  fit=site.stats)  # measured on calibration data: a per-channel fit
    pair = _linear_neighbours(site) if options.get("fuse_linear", True) and site.module is not None else None
    if pair is not None and x.channel_dim == len(x.shape) - 1:
        # fc1 -> act -> fc2 on channels-last maps: up-sample before fc1, down-sample after fc2 (exact, fewer FFTs)
        modules = dict(site.node.graph.owning_module.named_modules())
        factor = upsampling_factor(degree)
        return {pair[0].target: UpsampledLinear.from_linear(modules[pair[0].target], factor, x.spatial_dims),
                site.node.target: HighRatePolyActivation.fitted(fn, x.channels, degree, rng, **kwargs),
                pair[1].target: DownsampledLinear.from_linear(modules[pair[1].target], factor, x.spatial_dims)}
    # a module called at several places (torchvision's ResNet: one self.relu for all) may see several
    # channel counts: it gets one polynomial shared by all channels, fitted the same way
    channels = 1 if site.calls > 1 else x.channels
    return AliasFreePolyActivation.fitted(fn, channels, degree, rng, **kwargs)


RULES = [
    Rule(name="activation", family="activation", targets=ACTIVATIONS + FUNCTIONS + METHODS + (
        PolyActivation, AliasFreePolyActivation, LowpassPolyActivation, HighRatePolyActivation),
         judge=_judge_activation, convert=_convert_activation),
]
