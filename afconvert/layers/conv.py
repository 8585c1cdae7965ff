"""Circular convolutions, and strided convolutions made alias-free.

Both classes subclass ``nn.Conv2d`` and keep its parameters (``weight``, ``bias``), so the
state_dict keys and any checkpoint of the source layer load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.layers.graph_leaf import GraphLeaf
from afconvert.layers.spectral import ideal_downsample, ideal_resample, zero_nyquist

__all__ = ["circular_pad", "folded_kernel", "depthwise_taps", "CircularConv2d", "SampledConv2d", "AliasFreeConv2d",
           "AliasFreeConvTranspose2d", "IdealDownsample2d", "conv_output_size", "strided_output_size"]


def circular_pad(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Circular padding (left, right, top, bottom) of the last two dims, of any width.

    Unlike ``F.pad(mode="circular")`` the padding may exceed the map: it wraps as many times as
    needed, so the padded convolution is a true circular convolution (a 7x7 kernel on a 2x2 map).
    """
    left, right, top, bottom = [int(p) for p in pad]
    if min(pad) < 0:
        raise ValueError(f"circular padding must be non-negative, got {tuple(pad)}")
    H, W = x.shape[-2:]
    if left == right == top == bottom == 0:
        return x
    if max(left, right) <= W and max(top, bottom) <= H:
        return F.pad(x, (left, right, top, bottom), mode="circular")
    rows = torch.arange(-top, H + bottom, device=x.device) % H
    cols = torch.arange(-left, W + right, device=x.device) % W
    return x.index_select(-2, rows).index_select(-1, cols)


def _fold(weight: torch.Tensor, dim: int, n: int, dilation: int, before: int) -> torch.Tensor:
    """The kernel's taps along ``dim`` summed onto n offsets: tap a of a kernel that starts ``before`` samples early
    reads offset (a d - before) mod n."""
    if n == 1:
        return weight.sum(dim, keepdim=True)
    offsets = (torch.arange(weight.shape[dim], device=weight.device) * dilation - before) % n
    shape = list(weight.shape)
    shape[dim] = n
    return weight.new_zeros(shape).index_add(dim, offsets, weight)


def folded_kernel(weight: torch.Tensor, size: Sequence[int], pad: Sequence[int], dilation: Sequence[int]
                  ) -> tuple[torch.Tensor, tuple[int, int, int, int], tuple[int, int]]:
    """A stride-1 circular convolution on a map smaller than its kernel, as one with the kernel folded onto the map.

    On an n-periodic map, y[i] = sum_a w[a] x[(i + a d - p) mod n] = sum_u w'[u] x[(i + u) mod n] with
    w'[u] = sum of the taps with (a d - p) mod n = u: n taps instead of k (a 3 x 3 conv on a 1 x 1 map is a
    1 x 1 conv with the taps summed). Folds each dim where the map has fewer samples than the kernel has taps
    and the output keeps the map's size; returns (weight, pad (left, right, top, bottom), dilation) to use with
    ``circular_pad`` and a 'valid' conv. The same function, gradient included (the fold is linear)."""
    (kh, kw), (h, w) = weight.shape[-2:], size
    left, right, top, bottom = pad
    fold_h = h < kh and top + bottom == dilation[0] * (kh - 1)
    fold_w = w < kw and left + right == dilation[1] * (kw - 1)
    if fold_h and fold_w and h == w == 1:         # every tap onto one sample: one reduction over both dims
        return weight.sum((2, 3), keepdim=True), (0, 0, 0, 0), (1, 1)
    if fold_h:
        weight, top, bottom = _fold(weight, 2, h, dilation[0], top), 0, h - 1
    if fold_w:
        weight, left, right = _fold(weight, 3, w, dilation[1], left), 0, w - 1
    return weight, (left, right, top, bottom), (1 if fold_h else dilation[0], 1 if fold_w else dilation[1])


def depthwise_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dilation: Sequence[int] = (1, 1)) -> torch.Tensor:
    """A depthwise ('valid', stride 1) convolution as a sum over the kernel's taps of shifted maps times
    per-channel weights: y = b + sum_ij w[:, 0, i, j] x[..., i dh:, j dw:]. The same numbers as
    ``F.conv2d(groups=C)``; there for float64 on a CPU, where PyTorch loops over the channels one by one
    (here: one fused multiply-add pass per tap). x (N, C, H, W), weight (C, 1, kh, kw) -> (N, C, H', W')."""
    (kh, kw), (dh, dw) = weight.shape[-2:], dilation
    h, w = x.shape[-2] - dh * (kh - 1), x.shape[-1] - dw * (kw - 1)
    taps = weight.reshape(1, -1, kh * kw, 1, 1)
    y = torch.zeros_like(x[..., :h, :w]) if bias is None else bias.reshape(1, -1, 1, 1).expand_as(x[..., :h, :w])
    for i in range(kh):
        for j in range(kw):
            y = torch.addcmul(y, x[..., i * dh:i * dh + h, j * dw:j * dw + w], taps[:, :, i * kw + j])
    return y


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of a zero-padded strided convolution (``nn.Conv2d``'s formula)."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def strided_output_size(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], same_size: bool = False) -> tuple[int, int]:
    """A strided conv's output (H', W'): ``conv_output_size`` per dim, or ceil(N / s) for 'same' padding."""
    if same_size:
        return (-(-h // stride[0]), -(-w // stride[1]))
    return tuple(max(1, conv_output_size(n, k, s, p, d)) for n, k, s, p, d in zip((h, w), kernel, stride, padding,
                                                                                  dilation))


class CircularConv2d(GraphLeaf, nn.Conv2d):
    """Stride-1 convolution with circular padding: exactly equivariant to circular shifts.

    ``pad`` = (left, right, top, bottom); by default the source layer's symmetric padding, or
    (k-1)//2 left and k-1-(k-1)//2 right when the layer kept no padding (so H, W are kept).
    """

    def __init__(self, *args, pad: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.stride != (1, 1):
            raise ValueError("CircularConv2d is stride 1: use AliasFreeConv2d for strided layers")
        self.pad = tuple(pad) if pad is not None else _symmetric_pad(self)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pad: Sequence[int] | None = None) -> "CircularConv2d":
        """The same parameters (shared, not copied) in a circular stride-1 layer."""
        new = cls.__new__(cls)
        nn.Conv2d.__init__(new, conv.in_channels, conv.out_channels, conv.kernel_size, 1, 0, conv.dilation,
                           conv.groups, conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        new.pad = tuple(pad) if pad is not None else _symmetric_pad(conv)
        return new

    def _circular_conv(self, x: torch.Tensor) -> torch.Tensor:
        weight, pad, dilation = folded_kernel(self.weight, x.shape[-2:], self.pad, self.dilation)
        x = circular_pad(x, pad)
        if x.dtype is torch.float64 and x.device.type == "cpu" and self.groups > 1 and \
                self.groups == self.in_channels == self.out_channels:
            return depthwise_taps(x, weight, self.bias, dilation)
        return F.conv2d(x, weight, self.bias, 1, 0, dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._circular_conv(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", circular_pad={self.pad}"


class SampledConv2d(CircularConv2d):
    """A stride-s convolution as a stride-1 circular convolution followed by a down-sampler
    (``downsample``, in each subclass) to the source layer's own output size, so every downstream
    shape is unchanged. The weights are the source layer's. Optional extras, in order:

    * ``input_filter``: remove the input's Nyquist bins first (for the layer that reads the
      image: the only part of an image with no unique sub-pixel shift);
    * ``pre_down``: a module applied at the full rate before down-sampling (the paper's stem
      activation).
    """

    sampler = "subsampled"

    def __init__(self, *args, **kwargs):  # built with from_conv
        raise TypeError(f"build {type(self).__name__} with {type(self).__name__}.from_conv(conv, ...)")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pad: Sequence[int] | None = None, pre_down: nn.Module | None = None,
                  input_filter: bool = False, same_size: bool = False) -> "SampledConv2d":
        """``same_size``: the source pads dynamically (TF 'same'), its output is ceil(N / s)."""
        new = super().from_conv(conv, pad)
        new.down = tuple(conv.stride)
        new.source_padding = tuple(conv.padding) if not isinstance(conv.padding, str) else (0, 0)
        new.same_size = same_size or conv.padding == "same"
        new.input_filter = input_filter
        if pre_down is not None:
            new.pre_down = pre_down
        return new

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The source layer's output size: nn.Conv2d's formula, or ceil(N / s) for 'same' padding."""
        return strided_output_size(h, w, self.kernel_size, self.down, self.source_padding, self.dilation,
                                   self.same_size)

    def downsample(self, y: torch.Tensor, size: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """y (the stride-1 output) at the output ``size``; ``x`` is the layer's input (same H, W)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size(*x.shape[-2:])
        if self.input_filter:
            x = zero_nyquist(x)
        y = self._circular_conv(x)
        if "pre_down" in self._modules:
            y = self.pre_down(y)
        return self.downsample(y, size, x)

    def extra_repr(self) -> str:
        extra = ", input_filter=True" if self.input_filter else ""
        return super().extra_repr() + f", {self.sampler}_down={self.down}{extra}"


def _resample_macs(channels: int, n_in: Sequence[int], n_out: Sequence[int]) -> int:
    """Multiply-adds of the separable matmul form of ``ideal_resample`` on one image (first dim, then second)."""
    return channels * (n_out[0] * n_in[0] * n_in[1] + n_out[0] * n_in[1] * n_out[1])


class AliasFreeConv2d(SampledConv2d):
    """A stride-s convolution made alias-free: stride-1 circular conv, then ideal down-sampling.

    y = D_s(w (*) x), where (*) is circular convolution and D_s keeps the bins |k| < n/2 of the
    output size n (the source layer's own output size) and resamples. Computed in whichever of two
    equal forms costs fewer multiply-adds (the choice depends on sizes only):

    * as written: the stride-1 conv (s^2 times the strided conv's work), then D_s on its output;
    * low-pass first, when H, W are the stride times the output size: D_s(w (*) x) = (w (*) LP(x))[::s],
      LP keeping the output's band (|k| < n/2, as D_s does; computed as ``ideal_resample`` to n and back),
      so the *strided* conv runs on the low-passed input. A 1x1 conv commutes with D_s: D_s, then the conv.
    """

    sampler = "ideal"

    def downsample(self, y: torch.Tensor, size: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        return ideal_downsample(y, self.down, size=size)

    def _lowpass_first(self, h: int, w: int, size: tuple[int, int]) -> bool:
        """True when the strided form applies (no full-rate ``pre_down``, sizes divisible) and costs less."""
        if "pre_down" in self._modules or (h, w) != (size[0] * self.down[0], size[1] * self.down[1]):
            return False
        taps = self.kernel_size[0] * self.kernel_size[1]
        conv = self.in_channels // self.groups * self.out_channels * taps * h * w
        lowpass = _resample_macs(self.in_channels, (h, w), size) + _resample_macs(self.in_channels, size, (h, w))
        after = conv + _resample_macs(self.out_channels, (h, w), size)
        return lowpass + conv // (self.down[0] * self.down[1]) < after

    def deferred(self) -> "IdealDownsample2d":
        """Hand this layer's down-sampling to a layer of its own, to run after the pointwise layers that follow
        (BatchNorm, the activation): this layer becomes a stride-1 circular conv (input filter kept); returns
        the ``IdealDownsample2d`` that samples to the same output size."""
        if "pre_down" in self._modules:
            raise ValueError("a layer with a full-rate pre_down keeps its down-sampling")
        down = IdealDownsample2d(self.down, self.kernel_size, self.source_padding, self.dilation, self.same_size)
        self.down, self.same_size = (1, 1), True
        return down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down == (1, 1):     # its down-sampling deferred (``deferred``)
            return self._circular_conv(zero_nyquist(x) if self.input_filter else x)
        h, w = x.shape[-2:]
        size = self.output_size(h, w)
        pointwise = self.kernel_size == (1, 1) and "pre_down" not in self._modules
        if pointwise or self._lowpass_first(h, w, size):
            if self.input_filter and 1 in self.down:   # else the low-pass below removes the Nyquist bins too
                x = zero_nyquist(x)
            x = ideal_resample(x, size)
            if not pointwise:
                x = circular_pad(ideal_resample(x, (h, w)), self.pad)
            return F.conv2d(x, self.weight, self.bias, 1 if pointwise else self.down, 0, self.dilation, self.groups)
        return super().forward(x)


class IdealDownsample2d(GraphLeaf, nn.Module):
    """A strided conv's ideal down-sampling as a layer of its own: y = D_s(x) at the conv's output size
    (``strided_output_size`` of x's H, W). (N, C, H, W) -> (N, C, H', W').

    Pointwise layers (BatchNorm, an activation) commute with sampling, so moving a strided layer's sampling
    after them keeps the source network's function; moved after an alias-free activation, the activation
    reads the conv's full band and folds what it finds there into the kept band, where the down-sampling at
    the conv would have discarded it. Holds no parameters (it adds no state_dict keys)."""

    def __init__(self, stride: Sequence[int], kernel_size: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                 dilation: Sequence[int] = (1, 1), same_size: bool = False):
        super().__init__()
        self.down, self.kernel_size = tuple(stride), tuple(kernel_size)
        self.source_padding, self.dilation, self.same_size = tuple(padding), tuple(dilation), bool(same_size)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return strided_output_size(h, w, self.kernel_size, self.down, self.source_padding, self.dilation,
                                   self.same_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ideal_downsample(x, self.down, size=self.output_size(*x.shape[-2:]))

    def extra_repr(self) -> str:
        return f"ideal_down={self.down}"


def _symmetric_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) circular padding that keeps H, W at stride 1.

    The source layer's padding p goes on the left (so stride-1 output n lines up with the
    strided layer's sample s*n), the rest of the kernel's reach d(k-1) on the right.
    """
    if isinstance(conv.padding, str):  # 'same' / 'valid': centre the kernel
        ph = pw = None
    else:
        ph, pw = conv.padding
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
    top = reach_h // 2 if ph is None else min(ph, reach_h)
    left = reach_w // 2 if pw is None else min(pw, reach_w)
    return (left, reach_w - left, top, reach_h - top)


def tf_same_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """TF 'same' alignment for a strided conv on a size divisible by its stride: of the total
    padding d(k-1) + 1 - s, half (rounded down) on the left; circular stride-1 padding covers the
    rest of the kernel's reach on the right."""
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    rh, rw = dh * (kh - 1), dw * (kw - 1)
    top, left = max(rh + 1 - sh, 0) // 2, max(rw + 1 - sw, 0) // 2
    return (left, rw - left, top, rh - top)


def centered_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) = ((k-1)//2, k-1-(k-1)//2, ...): the paper's alignment."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    rh, rw = dh * (kh - 1), dw * (kw - 1)
    return (rw // 2, rw - rw // 2, rh // 2, rh - rh // 2)


class AliasFreeConvTranspose2d(GraphLeaf, nn.ConvTranspose2d):
    """A strided transposed convolution made exactly shift-equivariant, with the same parameters.

    ``nn.ConvTranspose2d`` with stride s inserts s - 1 zeros between samples (Z_s) and convolves with w; the
    zero insertion puts s copies of the input's spectrum on the fine grid, and the kernel passes part of the
    copies above the input's band (the checkerboard of decoders). Here the copies are removed first: y = w *
    LP(Z_s x) = w * U_s(x) / (s_h s_w), with U_s ideal up-sampling and * a circular convolution on the s H x
    s W grid, aligned as the original (y[n] = sum_m x[m] w[n - s m + p]). Output: (N, C_out, s_h H, s_w W),
    the size of the original when K - 2p + output_padding = s per dim (``matches``). An input shift d moves
    the output by s d, fractional shifts included.
    """

    @staticmethod
    def matches(m: nn.ConvTranspose2d) -> bool:
        """The original's output is s times its input (per dim), undilated, zero-padded: it has this form."""
        return m.padding_mode == "zeros" and tuple(m.dilation) == (1, 1) and all(
            k - 2 * p + op == s for k, p, op, s in zip(m.kernel_size, m.padding, m.output_padding, m.stride))

    @classmethod
    def from_conv(cls, m: nn.ConvTranspose2d) -> "AliasFreeConvTranspose2d":
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.output_padding, m.groups,
                  m.bias is not None, m.dilation, device=m.weight.device, dtype=m.weight.dtype)
        new.load_state_dict(m.state_dict())
        return new.train(m.training)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        sh, sw = self.stride
        kh, kw = self.kernel_size
        ph, pw = self.padding
        up = ideal_resample(x, (x.shape[-2] * sh, x.shape[-1] * sw), (-2, -1)) / (sh * sw)
        g = self.groups
        cin, cout_g = self.weight.shape[:2]
        # the transposed kernel as a correlation kernel: (C_out, C_in / g, kh, kw), flipped
        w = self.weight.view(g, cin // g, cout_g, kh, kw).transpose(1, 2).reshape(g * cout_g, cin // g, kh, kw)
        w = w.flip(-2, -1)
        up = circular_pad(up, (kw - 1 - pw, pw, kh - 1 - ph, ph))
        return F.conv2d(up, w, self.bias, groups=g)
