"""Convolutions (and transposed convolutions: zero insertion, then a convolution; alias-free as ideal
up-sampling, then a circular convolution, ``AliasFreeConvTranspose2d``).

* A stride-1 convolution with circular padding commutes with circular shifts (fractional ones
  included: it multiplies each frequency bin by the kernel's response).
* Zero padding breaks that at the borders; a 'valid' convolution shrinks the map.
* A stride-s convolution samples below Nyquist: frequencies above N/(2s) fold back (alias).
  Alias-free form: stride-1 circular convolution with the same weights, then ideal
  down-sampling (keep |k| < n/2 of the output size n, then resample):  y = D_s(w (*) x).
* ``defer``: D_s right after the conv keeps only the low 1/s of each axis' band: for the layer that
  reads the image, the network never sees the image's fine detail. Pointwise layers commute with
  sampling, so the sampling may move past the BatchNorm and activation that follow the conv (the
  paper's stem does this: conv at stride 1, activation, then down-sampling): the polynomial reads
  the full band and folds its products into the kept one. Exact for the source function (its
  sampling, moved), alias-free for the converted one; costs the activation at s^2 its rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame

from afconvert.converter import rule
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.conv import (
    AliasFreeConv2d,
    AliasFreeConvTranspose2d,
    CircularConv2d,
    SampledConv2d,
    centered_pad,
    tf_same_pad,
)
from afconvert.layers.poly import AliasFreePolyActivation, LowpassPolyActivation, ResidualActivation
from afconvert.layers.sampling import BlurConv2d, PolyphaseConv2d, SubsampledConv2d

FAMILY = "conv"


@dataclass(frozen=True)
class StemActivation:
    """[conv.stem_activation]: the paper's stem, x + gamma * s_out (c0 + c1 z + c2 z LPF_c(z)), z = s_in x,
    before the down-sampling of the layer that reads the image."""

    residual: bool = True
    cutoff: float = 0.75
    coef: tuple[float, float, float] = (0.0, 1.0, 0.0)
    in_scale: float = 1.0
    out_scale: float = 1.0
    train_scale: bool = False
    gamma: float = 0.0


@dataclass(frozen=True)
class Options(rule.Options):
    """[conv]"""

    replace: str = "ideal"          # strided convs: "ideal" (alias-free), "blur" (BlurPool), "aps" (adaptive
                                    # polyphase sampling), "circular" (circular padding, stride kept); "keep"
    padding: str = field(default="circular", metadata={"choices": ("circular", "source")})  # of stride-1 convs
    alignment: str = field(default="source", metadata={"choices": ("source", "centered")})  # strided sampling grid
    input_filter: bool = True       # the layer reading the image drops its Nyquist bins
    blur_size: int = 3              # "blur": width of the binomial filter
    stem_activation: StemActivation | None = None
    defer: str = field(default="none", metadata={"choices": ("none", "input", "all")})  # down-sample after the
                                    # BatchNorm + activation that follow a strided conv ("input": only the layer
                                    # that reads the image; "all": every one)


def _judge_conv(site: Site, options: Options) -> Judgement:
    conv: nn.Conv2d = site.module
    peer = rule.judge_sampler(conv, getattr(conv, "down", (1, 1)), site.x)
    if peer is not None:
        return peer
    if isinstance(conv, AliasFreeConv2d):
        pre = getattr(conv, "pre_down", None)
        if pre is not None and not _stem_activation_is_exact(pre, conv.down):
            return Judgement(Verdict.APPROX, "full-rate activation before down-sampling leaves aliases in band")
        extra = "; input Nyquist bins removed" if conv.input_filter else ""
        if conv.down == (1, 1):
            return Judgement(Verdict.EXACT, f"stride-1 circular conv, its down-sampling deferred past the "
                                            f"activation after it{extra}")
        return Judgement(Verdict.EXACT, f"circular conv + ideal down-sampling by {conv.down}{extra}")
    if isinstance(conv, CircularConv2d):
        return Judgement(Verdict.EXACT, "stride-1 circular convolution")
    stride = tuple(conv.stride)
    problems = []
    if stride != (1, 1):
        problems.append(f"stride {stride[0] if stride[0] == stride[1] else stride} sub-samples below Nyquist")
    if type(conv) is Conv2dSame:
        problems.append("TF 'same' zero padding breaks circular equivariance")
    else:
        problems.extend(_padding_problems(conv))
    if problems:
        return Judgement(Verdict.NOT, "; ".join(problems))
    return Judgement(Verdict.EXACT, "pointwise (1x1) or circular stride-1 convolution")


def _padding_problems(conv: nn.Conv2d) -> list[str]:
    """Why a convolution's padding is not circular over exactly its reach (the map's period kept), if it is not:
    zero (or reflect, replicate) padding, a 'valid' convolution, or circular padding by more or less than the
    kernel's reach (the output longer or shorter than the map)."""
    reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    pad = conv.padding
    total = list(reach) if pad == "same" else [0, 0] if pad == "valid" else [2 * p for p in pad]
    if total == reach and (conv.padding_mode == "circular" or not any(reach)):
        return []
    if conv.padding_mode == "circular":
        return [f"circular padding {tuple(pad) if not isinstance(pad, str) else pad} does not match the kernel's reach "
                f"{tuple(reach)}: the output is not the map's period"]
    if any(total):
        return [f"{'zero' if conv.padding_mode == 'zeros' else conv.padding_mode} padding "
                f"{pad if isinstance(pad, str) else tuple(pad)} breaks circular equivariance"]
    if any(k > s for k, s in zip(conv.kernel_size, conv.stride)):  # patchify (k <= s) reads no border
        return ["unpadded ('valid') convolution treats the map as finite, not circular"]
    return []


def _stem_activation_is_exact(pre: nn.Module, down: tuple[int, int]) -> bool:
    """A low-pass polynomial with cutoff c folds its aliases down to (1 - c) N / 2: exact iff 1/s <= 1 - c."""
    act = pre.act if isinstance(pre, ResidualActivation) else pre
    if not isinstance(act, LowpassPolyActivation):
        return False
    return all(1.0 / s <= 1.0 - act.cutoff + 1e-12 for s in down)


def _plan(site: Site, options: Options):
    """(conv, circular padding, strided?, TF-'same'?) of a conv this family converts, or None."""
    conv: nn.Conv2d = site.module
    if type(conv) not in (nn.Conv2d, Conv2dSame) or not site.spatial:
        return None
    if site.x is None or site.x.spatial_dims != (2, 3):
        return None
    strided = tuple(conv.stride) != (1, 1)
    reach = any(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    if not strided and not reach:
        return None  # 1x1 stride 1: already exact
    tf_same = type(conv) is Conv2dSame
    if options.alignment == "centered":
        pad = centered_pad(conv)
    else:
        pad = tf_same_pad(conv) if tf_same else None
    return conv, pad, strided, tf_same


def _sampled(cls: type[SampledConv2d]):
    """The strategy: stride-1 convs made circular; strided ones a stride-1 circular conv + ``cls``'s sampler."""
    def strategy(site: Site, options: Options) -> nn.Module | None:
        planned = _plan(site, options)
        if planned is None:
            return None
        conv, pad, strided, tf_same = planned
        if not strided:
            return CircularConv2d.from_conv(conv, pad) if options.padding == "circular" else None
        pre_down = None
        stem = options.stem_activation
        if stem is not None and site.reads_input:
            act = LowpassPolyActivation(conv.out_channels, cutoff=stem.cutoff, coef=list(stem.coef),
                                        in_scale=stem.in_scale, out_scale=stem.out_scale, train_scale=stem.train_scale)
            pre_down = ResidualActivation(act, gamma=stem.gamma) if stem.residual else act
        new = cls.from_conv(conv, pad, pre_down=pre_down, same_size=tf_same,
                            input_filter=options.input_filter and site.reads_input)
        if cls is BlurConv2d:
            new.filt_size = options.blur_size
        return new
    return strategy


def _judge_transposed(site: Site, options: Options) -> Judgement:
    m = site.module
    if isinstance(m, AliasFreeConvTranspose2d):
        return Judgement(Verdict.EXACT, f"ideal up-sampling by {m.stride} and a circular convolution: an input "
                                        f"shift d moves the output by {m.stride[0]} d")
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    if tuple(m.stride) == (1, 1):
        return Judgement(Verdict.NOT, "zero padding: not shift-equivariant at the borders")
    return Judgement(Verdict.NOT, f"transposed conv with stride {tuple(m.stride)}: zero insertion leaves spectral "
                                  f"images (aliases) that the kernel passes")


def _ideal_transposed(site: Site, options: Options):
    m = site.module
    if isinstance(m, AliasFreeConvTranspose2d) or not site.spatial or site.x is None or site.x.spatial_dims != (2, 3):
        return None
    return AliasFreeConvTranspose2d.from_conv(m) if AliasFreeConvTranspose2d.matches(m) else None


# layers that act on each pixel alone (BatchNorm at eval: a per-channel affine map), which sampling commutes with;
# matched by exact type (timm's BatchNormAct2d subclasses BatchNorm2d and holds an activation)
_POINTWISE = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)


def _reads_rank(node: fx.Node) -> bool:
    """``x.ndim`` / ``x.dim()`` (timm's norm layers assert it): unchanged when the sampling moves."""
    return (node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",)) or \
        (node.op == "call_method" and node.target == "dim")


def _activation_after(site: Site, by_node: dict[fx.Node, Site], swaps: dict) -> AliasFreePolyActivation | None:
    """The alias-free activation that ``site``'s output reaches through pointwise layers only, each the one user
    of the one before (reading its rank aside) and none replaced, or None."""
    node = site.node
    while len(users := [u for u in node.users if not _reads_rank(u)]) == 1:
        user = users[0]
        nxt = by_node.get(user)
        if nxt is None or user.args[:1] != (node,):
            return None
        new = swaps.get(nxt.name)
        if new:
            act = new[0]
            fits = len(new) == 1 and type(act) is AliasFreePolyActivation and nxt.calls == 1 and \
                act.channel_dim == 1 and act.spatial_dims == (2, 3) and "post_down" not in act._modules
            return act if fits else None
        if type(nxt.module) not in _POINTWISE and user.target is not F.batch_norm:
            return None
        node = user
    return None


def defer_downsampling(sites: list[Site], swaps: dict[str, list[nn.Module]]) -> None:
    """Per the options' ``defer``: move each (or the input layer's) ``AliasFreeConv2d``'s down-sampling into the
    activation its output reaches through pointwise layers (``IdealDownsample2d`` as the activation's
    ``post_down``). Rewrites the planned replacements in place."""
    by_node = {s.node: s for s in sites}
    for site in sites:
        defer = getattr(site.options, "defer", "none")
        new = swaps.get(site.name)
        if defer == "none" or (defer == "input" and not site.reads_input) or not new or len(new) != 1:
            continue
        conv = new[0]
        if type(conv) is not AliasFreeConv2d or conv.down == (1, 1) or "pre_down" in conv._modules or site.calls != 1:
            continue
        act = _activation_after(site, by_node, swaps)
        if act is not None:
            act.post_down = conv.deferred()


RULES = [
    Rule(name="conv2d", family=FAMILY, targets=(nn.Conv2d, Conv2dSame, CircularConv2d, AliasFreeConv2d, BlurConv2d,
                                                PolyphaseConv2d, SubsampledConv2d),
         judge=_judge_conv, strategies={"ideal": _sampled(AliasFreeConv2d), "blur": _sampled(BlurConv2d),
                                        "aps": _sampled(PolyphaseConv2d), "circular": _sampled(SubsampledConv2d)}),
    Rule(name="conv_transpose2d", family=FAMILY, targets=(nn.ConvTranspose2d, AliasFreeConvTranspose2d),
         judge=_judge_transposed, strategies={"ideal": _ideal_transposed}),
]

# graph passes the engine runs over the planned swaps (see afconvert.converter.rule)
PASSES = (defer_downsampling,)
