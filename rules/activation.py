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
with s a per-sample, per-channel norm of its input map (``scale``: the in-band scale by default, see
``afconvert.layers.quadratic``; or ``l4_scale`` on the 2x grid): like ReLU, its output scales linearly
with its input, so stacks of them stay bounded at every input size and scale (a plain quadratic
squares the scale at each layer, and deep BatchNorm networks overflow).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import activations as timm_act

from afconvert.converter import rule
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.poly import (
    NORMALIZE,
    SCALES,
    AliasFreePolyActivation,
    LowpassPolyActivation,
    PolyActivation,
    PolyFit,
    scale_dims,
    upsampling_factor,
)
from afconvert.layers.resample import DownsampledLinear, HighRatePolyActivation, UpsampledLinear

FAMILY = "activation"


@dataclass(frozen=True)
class Options(rule.Options):
    """[activation]"""

    replace: str = "poly"                   # "poly": alias-free polynomial; "keep"
    degree: int = 2                         # evaluated on the signal up-sampled by ceil((degree + 1) / 2)
    fit_range: tuple[float, float] = (-3.0, 3.0)   # least-squares fit of the original activation over this range
    in_scale: float = 1.0                   # the paper's input / output scales (the fit absorbs them)
    out_scale: float = 1.0
    train_scale: bool = False
    normalize: str = field(default="channel", metadata={"choices": NORMALIZE})  # scale-equivariant: s q(x / s)
    scale: str = field(default="inband", metadata={"choices": SCALES})  # s: "inband" (energy of the band-limited
                                            # square, no 2x map: the fast form), "outband" (its energy in the band
                                            # the layer outputs: a deferred down-sampling fused in) or "l4" (L4
                                            # norm on the 2x grid)
    fuse_linear: bool = False               # fc1 -> act -> fc2: up-sample before fc1, down-sample after fc2

    def __post_init__(self):
        if self.fuse_linear and self.normalize != "none" and self.scale != "l4":
            raise ValueError(f"fuse_linear runs the polynomial on the 2x grid, where its scale is the L4 norm; "
                             f"fix: scale = \"l4\" (or fuse_linear = false), not '{self.scale}'")


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
    if site.module is not None:
        return site.module.eval()
    args = site.constant_args()
    if args is None:
        return None  # a parameter that is itself computed: not a fixed function
    rest, kwargs = args
    kwargs.pop("inplace", None)
    node = site.node
    if node.op == "call_method":
        return lambda t: getattr(t, node.target.rstrip("_"))(*rest, **kwargs)
    return lambda t: node.target(t, *[a for a in rest if not isinstance(a, bool)], **kwargs)


def _judge_high_rate(site: Site, act: HighRatePolyActivation) -> Judgement:
    pair = linear_neighbours(site)
    if pair is not None:
        up, down = (site.analysis.module(n.target) for n in pair)
        if isinstance(up, UpsampledLinear) and isinstance(down, DownsampledLinear) and \
                up.factor == down.factor >= upsampling_factor(act.degree):
            return Judgement(Verdict.EXACT, f"degree-{act.degree} polynomial between ideal {up.factor}x up-sampling "
                                            f"({pair[0].target}) and down-sampling ({pair[1].target})")
    return Judgement(Verdict.NOT, "high-rate polynomial without its up-/down-sampling neighbours")


def _judge_activation(site: Site, options: Options) -> Judgement:
    act = site.module
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input: already shift-invariant")
    if isinstance(act, HighRatePolyActivation):
        return _judge_high_rate(site, act)
    if isinstance(act, AliasFreePolyActivation):
        down = act._modules.get("post_down")
        then = f", then ideal down-sampling by {down.down} (a strided conv's, deferred)" if down is not None else ""
        return Judgement(Verdict.EXACT, f"degree-{act.degree} polynomial at {act.up}x rate, ideal low-pass back{then}")
    if isinstance(act, LowpassPolyActivation):
        return Judgement(Verdict.APPROX, "low-pass polynomial at the input rate: exact only before a coarse down-sampling")
    if isinstance(act, PolyActivation):
        return Judgement(Verdict.INTEGER, f"degree-{act.degree} polynomial at the input rate aliases its harmonics "
                                          f"(pointwise: exact for integer shifts only)")
    return Judgement(Verdict.INTEGER, "pointwise nonlinearity creates harmonics above Nyquist (exact for integer "
                                      "shifts only)")


def _convertible(site: Site) -> bool:
    x = site.x
    return site.spatial and not isinstance(site.module, PolyActivation) and x is not None \
        and x.spatial_dims is not None and x.channel_dim is not None


def _poly(site: Site, options: Options) -> nn.Module | None:
    """The activation as an alias-free polynomial, per channel (one shared by all channels when the module is
    called at several places: torchvision's ResNet has one self.relu, seen with several channel counts)."""
    fn = _function_of(site)
    if fn is None or not _convertible(site):
        return None  # kept, and judged: not alias-free (computed arguments, flattened or unknown layout)
    x = site.x
    channels = 1 if site.calls > 1 else x.channels
    return AliasFreePolyActivation.fitted(
        fn, channels, options.degree, options.fit_range, in_scale=options.in_scale, out_scale=options.out_scale,
        train_scale=options.train_scale, channel_dim=x.channel_dim, normalize=options.normalize,
        spatial_dims=x.spatial_dims, scale=options.scale, fit=site.stats)  # measured on calibration data: a per-channel fit


def _measure(site: Site, options: Options) -> PolyFit | None:
    """Least-squares statistics of the site's polynomial against the source activation (``PolyFit``)."""
    if site.module is None or not _convertible(site):
        return None
    x = site.x
    return PolyFit(options.degree, x.channel_dim, scale_dims(options.normalize, x.spatial_dims, x.channel_dim),
                   shared=site.calls > 1, scale=options.scale, spatial_dims=x.spatial_dims)


# pointwise modules that may stand between an activation and the next Linear (timm's Mlp: drop1, norm)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def linear_neighbours(site: Site) -> tuple[fx.Node, fx.Node] | None:
    """(fc1, fc2) call_module nodes of Linears when the site is fc1 -> act -> [identity/dropout] -> fc2,
    each used once, so the pair can carry the up- and down-sampling."""
    node, analysis = site.node, site.analysis
    before = node.args[0] if node.args else None
    if not (isinstance(before, fx.Node) and before.op == "call_module" and len(before.users) == 1):
        return None
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_module" or len(nxt.args) != 1:
            return None
        if isinstance(analysis.module(nxt.target), _PASS_THROUGH):
            cur = nxt
            continue
        linear = (nn.Linear, UpsampledLinear, DownsampledLinear)
        both = isinstance(analysis.module(before.target), linear) and isinstance(analysis.module(nxt.target), linear)
        return (before, nxt) if both else None
    return None


def fuse_linear_around_activations(sites: list[Site], swaps: dict[str, list[nn.Module]]) -> None:
    """For each activation converted to an ``AliasFreePolyActivation`` on channels-last maps between two
    Linears, when its options say ``fuse_linear``: run the up-sampling before fc1 and the down-sampling
    after fc2 instead (exact). Rewrites ``swaps`` (module path -> replacements) in place."""
    for site in sites:
        new = swaps.get(site.name)
        x = site.x
        if site.module is None or not new or type(new[0]) is not AliasFreePolyActivation or len(new) != 1:
            continue
        if not getattr(site.options, "fuse_linear", False) or x is None or x.channel_dim != len(x.shape) - 1:
            continue
        pair = linear_neighbours(site)
        if pair is None or any(n.target in swaps for n in pair):
            continue
        act = new[0]
        fc1, fc2 = (site.analysis.module(n.target) for n in pair)
        swaps[pair[0].target] = [UpsampledLinear.from_linear(fc1, act.up, x.spatial_dims)]
        swaps[site.name] = [HighRatePolyActivation.from_poly(act)]
        swaps[pair[1].target] = [DownsampledLinear.from_linear(fc2, act.up, x.spatial_dims)]


RULES = [
    Rule(name="activation", family=FAMILY, targets=ACTIVATIONS + FUNCTIONS + METHODS + (
        PolyActivation, AliasFreePolyActivation, LowpassPolyActivation, HighRatePolyActivation),
         judge=_judge_activation, strategies={"poly": _poly}, measure=_measure),
]

# graph passes the engine runs over the planned swaps (see afconvert.converter.rule)
PASSES = (fuse_linear_around_activations,)
