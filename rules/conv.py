"""Convolutions.

* A stride-1 convolution with circular padding commutes with circular shifts (fractional ones
  included: it multiplies each frequency bin by the kernel's response).
* Zero padding breaks that at the borders; a 'valid' convolution shrinks the map.
* A stride-s convolution samples below Nyquist: frequencies above N/(2s) fold back (alias).
  Alias-free form: stride-1 circular convolution with the same weights, then ideal
  down-sampling (keep |k| < n/2 of the output size n, then resample):  y = D_s(w (*) x).
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import Conv2dSame

from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.conv import (
    AliasFreeConv2d,
    CircularConv2d,
    centered_pad,
    tf_same_pad,
)
from afconvert.layers.poly import LowpassPolyActivation, ResidualActivation


def _judge_conv(site: Site, options: dict) -> Judgement:
    conv: nn.Conv2d = site.module
    if isinstance(conv, AliasFreeConv2d):
        pre = conv._modules.get("pre_down")
        if pre is not None and not _stem_activation_is_exact(pre, conv.down):
            return Judgement(Verdict.APPROX, "full-rate activation before down-sampling leaves aliases in band")
        extra = "; input Nyquist bins removed" if conv.input_filter else ""
        return Judgement(Verdict.EXACT, f"circular conv + ideal down-sampling by {conv.down}{extra}")
    if isinstance(conv, CircularConv2d):
        return Judgement(Verdict.EXACT, "stride-1 circular convolution")
    stride = tuple(conv.stride)
    pad = conv.padding
    reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    problems = []
    if stride != (1, 1):
        problems.append(f"stride {stride[0] if stride[0] == stride[1] else stride} sub-samples below Nyquist")
    if type(conv) is Conv2dSame:
        problems.append("TF 'same' zero padding breaks circular equivariance")
    elif any(reach) and conv.padding_mode != "circular":
        unpadded = not isinstance(pad, str) and not any(pad)
        if not unpadded:
            problems.append(f"{'zero' if conv.padding_mode == 'zeros' else conv.padding_mode} padding "
                            f"{pad if isinstance(pad, str) else tuple(pad)} breaks circular equivariance")
        elif any(k > s for k, s in zip(conv.kernel_size, stride)):  # patchify (k <= s) reads no border
            problems.append("unpadded ('valid') convolution treats the map as finite, not circular")
    if problems:
        return Judgement(Verdict.NOT, "; ".join(problems))
    return Judgement(Verdict.EXACT, "pointwise (1x1) or circular stride-1 convolution")


def _stem_activation_is_exact(pre: nn.Module, down: tuple[int, int]) -> bool:
    """A low-pass polynomial with cutoff c folds its aliases down to (1 - c) N / 2: exact iff 1/s <= 1 - c."""
    act = pre.act if isinstance(pre, ResidualActivation) else pre
    if not isinstance(act, LowpassPolyActivation):
        return False
    return all(1.0 / s <= 1.0 - act.cutoff + 1e-12 for s in down)


def _convert_conv(site: Site, options: dict) -> nn.Module | None:
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
    if options.get("alignment", "source") == "centered":
        pad = centered_pad(conv)
    else:
        pad = tf_same_pad(conv) if tf_same else None
    if not strided:
        if options.get("padding", "circular") != "circular":
            return None
        return CircularConv2d.from_conv(conv, pad)
    pre_down = None
    stem = options.get("stem_activation")
    if stem and site.reads_input:
        act = LowpassPolyActivation(conv.out_channels, cutoff=float(stem.get("cutoff", 0.75)),
                                    coef=stem.get("coef"), in_scale=stem.get("in_scale", 1.0),
                                    out_scale=stem.get("out_scale", 1.0), train_scale=stem.get("train_scale", False))
        pre_down = ResidualActivation(act, gamma=stem.get("gamma", 0.0)) if stem.get("residual", True) else act
    return AliasFreeConv2d.from_conv(conv, pad, pre_down=pre_down, same_size=tf_same,
                                     input_filter=bool(options.get("input_filter", False)) and site.reads_input)


RULES = [
    Rule(name="conv2d", family="conv", targets=(nn.Conv2d, Conv2dSame, CircularConv2d, AliasFreeConv2d),
         judge=_judge_conv, convert=_convert_conv),
]
