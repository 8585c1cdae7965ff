"""The down-samplers of other shift-robust methods, as layers: for comparing them with alias-free
(ideal) down-sampling under the same certificate and the same evaluation.

* **Blur** (BlurPool: Zhang, ICML 2019; adobe's antialiased-cnns, timm's ``BlurPool2d``): a fixed
  binomial low-pass, then sub-sampling. It reduces aliasing, does not remove it: approximate.
* **Adaptive polyphase sampling** (APS: Chaman & Dokmanic, CVPR 2021): of the s x s polyphase
  components, keep the one with the largest norm (per sample). An integer circular shift of the input
  permutes the components, so the choice follows it: exactly invariant to integer circular shifts
  when the map size is a multiple of s; not to fractional shifts. The phase is chosen on the layer's
  *input*, so two layers that down-sample the same map (a ResNet block's strided conv and its
  strided shortcut) choose the same phase and their outputs stay aligned when added; chosen on each
  output, as the paper's per-layer form, they may disagree and the block is no longer invariant
  (the paper's code passes the main path's phase to the shortcut for the same reason).
* **Sub-sampling** (keep every s-th sample): what a strided layer does, with circular padding.

Each is a function ``(x, stride, size) -> y`` on NCHW maps, taking samples (s*i + offset) mod N so
the output has the source layer's own size, and a conv / pool class built like ``AliasFreeConv2d`` /
``AliasFreePool2d`` (the same parameters, the same state_dict keys).
"""
from __future__ import annotations

import enum
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from afconvert.layers.conv import SampledConv2d, circular_pad
from afconvert.layers.pool import SampledPool2d

__all__ = ["ShiftGuarantee", "binomial_filter", "blur_downsample", "polyphase_downsample", "subsample", "BlurConv2d",
           "BlurPool2d", "PolyphaseConv2d", "PolyphasePool2d", "SubsampledConv2d", "SubsampledPool2d"]


class ShiftGuarantee(enum.Enum):
    """What a peer's down-sampler guarantees under circular shifts of its input (its value: why, for a
    stride ``{s}``); the converter turns it into the layer's verdict."""

    INTEGER = "adaptive polyphase sampling by {s}: invariant to integer circular shifts only"
    REDUCED = "binomial blur and sub-sampling by {s}: reduces aliasing, does not remove it"
    NONE = "circular, but sub-sampling by {s} keeps frequencies above Nyquist"


def _take(x: torch.Tensor, stride: Sequence[int], size: Sequence[int], offset=(0, 0)) -> torch.Tensor:
    """x[..., (s*i + o) mod H, (s*j + o') mod W] for i < size[0], j < size[1]."""
    H, W = x.shape[-2:]
    rows = (torch.arange(size[0], device=x.device) * stride[0] + offset[0]) % H
    cols = (torch.arange(size[1], device=x.device) * stride[1] + offset[1]) % W
    return x.index_select(-2, rows).index_select(-1, cols)


def subsample(x: torch.Tensor, stride: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Every s-th sample from the first: a strided layer's sampling."""
    return _take(x, stride, size)


def binomial_filter(size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalised 2D binomial filter of width ``size``: outer product of the row of Pascal's triangle."""
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=dtype, device=device)
    f = torch.outer(row, row)
    return f / f.sum()


def blur_downsample(x: torch.Tensor, stride: Sequence[int], size: Sequence[int], filt_size: int = 3) -> torch.Tensor:
    """Binomial blur of width ``filt_size`` (circular, centred), then sub-sampling."""
    c = x.shape[1]
    f = binomial_filter(filt_size, x.dtype, x.device).expand(c, 1, filt_size, filt_size)
    r = filt_size - 1
    y = F.conv2d(circular_pad(x, (r // 2, r - r // 2, r // 2, r - r // 2)), f, groups=c)
    return subsample(y, stride, size)


def _components(x: torch.Tensor, stride: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    offsets = [(i, j) for i in range(stride[0]) for j in range(stride[1])]
    return torch.stack([_take(x, stride, size, o) for o in offsets], dim=1)            # (N, s*s, C, h, w)


def polyphase_downsample(y: torch.Tensor, stride: Sequence[int], size: Sequence[int],
                         chooser: torch.Tensor | None = None) -> torch.Tensor:
    """APS: per sample, the polyphase component (offset (i, j), 0 <= i, j < s) of ``y`` whose counterpart
    in ``chooser`` (default ``y``; same H, W) has the largest L2 norm over C, H, W (the first on ties)."""
    comps = _components(y, stride, size)
    ref = comps if chooser is None else _components(chooser, stride, size)
    best = ref.flatten(2).norm(dim=2).argmax(dim=1)                                     # (N,)
    return comps[torch.arange(y.shape[0], device=y.device), best]


class SubsampledConv2d(SampledConv2d):
    """A strided convolution with circular padding: stride-1 circular conv, then sub-sampling."""

    sampler = "subsampled"
    guarantee = ShiftGuarantee.NONE

    def downsample(self, y, size, x):
        return subsample(y, self.down, size)


class BlurConv2d(SampledConv2d):
    """BlurPool after a strided convolution: stride-1 circular conv, binomial blur, sub-sampling."""

    sampler = "blur"
    guarantee = ShiftGuarantee.REDUCED
    filt_size = 3

    def downsample(self, y, size, x):
        return blur_downsample(y, self.down, size, self.filt_size)


class PolyphaseConv2d(SampledConv2d):
    """APS after a strided convolution: stride-1 circular conv, adaptive polyphase sampling (the phase
    chosen on the layer's input)."""

    sampler = "aps"
    guarantee = ShiftGuarantee.INTEGER

    def downsample(self, y, size, x):
        return polyphase_downsample(y, self.down, size, chooser=x)


class SubsampledPool2d(SampledPool2d):
    """A strided pool on the circular map: its local operator at stride 1, then sub-sampling."""

    sampler = "subsampled"
    guarantee = ShiftGuarantee.NONE

    def downsample(self, y, size, x):
        return subsample(y, self.stride, size)


class BlurPool2d(SampledPool2d):
    """BlurPool: the pool's local operator at stride 1 (MaxBlurPool for max pooling), binomial blur,
    sub-sampling."""

    sampler = "blur"
    guarantee = ShiftGuarantee.REDUCED
    filt_size = 3

    def downsample(self, y, size, x):
        return blur_downsample(y, self.stride, size, self.filt_size)


class PolyphasePool2d(SampledPool2d):
    """APS pooling: the pool's local operator at stride 1, then adaptive polyphase sampling (the phase
    chosen on the pool's input)."""

    sampler = "aps"
    guarantee = ShiftGuarantee.INTEGER

    def downsample(self, y, size, x):
        return polyphase_downsample(y, self.stride, size, chooser=x)
