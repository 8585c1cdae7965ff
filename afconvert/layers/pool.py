"""Pooling made alias-free.

A stride-s pool is a local operator followed by sub-sampling. Average pooling's local operator is a
linear box filter: as a stride-1 circular filter followed by ideal down-sampling it is exact. Max
pooling's local operator is a nonlinearity; the exact alias-free replacement drops it and keeps
only the ideal low-pass down-sampling, the approximate one keeps a stride-1 circular max before
the ideal down-sampling (its harmonics still alias, by less than a strided max).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.layers.conv import circular_pad
from afconvert.layers.graph_leaf import GraphLeaf
from afconvert.layers.spectral import ideal_downsample

__all__ = ["SampledPool2d", "AliasFreePool2d", "BroadcastGlobalPool2d", "pool_output_size"]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pool_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False,
                     same: bool = False) -> int:
    """The output length of ``nn.MaxPool2d``/``nn.AvgPool2d`` (or ceil(n / s) for TF 'same')."""
    if same:
        return math.ceil(n / stride)
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= n + padding:
        out -= 1
    return max(out, 1)


class SampledPool2d(GraphLeaf, nn.Module):
    """A stride-s pool as its local operator at stride 1 on the circular map, then a down-sampler
    (``downsample``, in each subclass) to the source pool's output size. ``mode``: 'avg' (circular box
    filter), 'max' (circular max) or 'ideal' (no local operator). (N, C, H, W) -> (N, C, h, w).
    ``divisor_override``: the box filter divides its window's sum by it (as ``nn.AvgPool2d``'s) instead of
    the window's size."""

    sampler = "subsampled"

    def __init__(self, mode: str, kernel_size, stride, padding=0, dilation=1, ceil_mode: bool = False,
                 same: bool = False, divisor_override: int | None = None):
        super().__init__()
        if mode not in ("avg", "ideal", "max"):
            raise ValueError(f"pool mode must be 'avg', 'ideal' or 'max', got '{mode}'")
        self.mode, self.same, self.ceil_mode = mode, same, ceil_mode
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride if stride is not None else kernel_size)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.divisor_override = divisor_override

    @classmethod
    def from_pool(cls, pool: nn.Module, mode: str, same: bool = False) -> "SampledPool2d":
        return cls(mode, pool.kernel_size, pool.stride, pool.padding, getattr(pool, "dilation", 1),
                   getattr(pool, "ceil_mode", False), same, getattr(pool, "divisor_override", None))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple(pool_output_size(n, k, s, p, d, self.ceil_mode, self.same) for n, k, s, p, d in
                     zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        rh, rw = dh * (kh - 1), dw * (kw - 1)
        xp = circular_pad(x, (rw // 2, rw - rw // 2, rh // 2, rh - rh // 2))
        if self.mode == "avg":
            divisor = self.divisor_override or kh * kw
            if self.dilation == (1, 1):
                return F.avg_pool2d(xp, self.kernel_size, 1, divisor_override=divisor)
            return F.conv2d(xp, x.new_full((x.shape[1], 1, kh, kw), 1.0 / divisor), dilation=self.dilation,
                            groups=x.shape[1])
        return F.max_pool2d(xp, self.kernel_size, 1, 0, self.dilation)

    def downsample(self, y: torch.Tensor, size: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """y (the local operator's stride-1 output) at the output ``size``; ``x`` is the pool's input."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size(*x.shape[-2:])
        y = self._local(x) if self.mode != "ideal" else x
        return self.downsample(y, size, x)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, kernel_size={self.kernel_size}, stride={self.stride}, sampler={self.sampler}"


class AliasFreePool2d(SampledPool2d):
    """``mode``: 'avg' (circular box filter, exact), 'ideal' (no local operator, exact) or 'max'
    (circular stride-1 max, approximate); then ideal down-sampling to the source pool's output size."""

    sampler = "ideal"

    def downsample(self, y: torch.Tensor, size: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        return ideal_downsample(y, self.stride, size=size)


class BroadcastGlobalPool2d(GraphLeaf, nn.Module):
    """The global average of each channel at every cell of a fixed ``output_size`` grid:
    (N, C, H, W) -> (N, C, h, w), y[n, c, i, j] = mean_{y, x} x[n, c, y, x].

    Exactly shift-invariant. In place of ``nn.AdaptiveAvgPool2d((h, w))`` before a flatten and a Linear
    (VGG's and AlexNet's heads), the Linear reads a spatially constant map: it acts as a Linear over the
    global average whose weight is the original's summed over the h x w positions, equal to the original
    head wherever the pooled map is spatially constant."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True).expand(*x.shape[:-2], *self.output_size).contiguous()  # .view()-able

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
