"""Pointwise layers that move a signal to and from a higher sampling rate.

Ideal up-sampling U and down-sampling D are linear and act on each channel alone, so they commute
with any pointwise linear map W (a Linear over channels-last maps, a 1x1 conv): U(W x) = W U(x)
and D(W z) = W D(z). A block ``fc1 -> activation -> fc2`` made alias-free as
``fc1 -> D(p(U(.))) -> fc2`` may therefore run as ``D(fc2(p(fc1(U(x)))))``: the same function,
with the FFTs on the block's C channels instead of its expanded (e.g. 4C) hidden channels. This is
how the official ConvNeXt-AFC builds its MLP. Both layers keep ``nn.Linear``'s parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.layers.graph_leaf import GraphLeaf
from afconvert.layers.poly import PolyActivation
from afconvert.layers.spectral import ideal_resample

__all__ = ["UpsampledLinear", "DownsampledLinear", "HighRatePolyActivation", "IdealUpsample", "IdealResize"]


def _share(cls, linear: nn.Linear, factor: int, spatial_dims: Sequence[int]):
    new = cls.__new__(cls)
    nn.Linear.__init__(new, linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight, linear.bias
    new.train(linear.training)
    new.factor, new.spatial_dims = int(factor), tuple(spatial_dims)
    return new


class UpsampledLinear(GraphLeaf, nn.Linear):
    """y = W U_f(x) + b: ideal up-sampling by ``factor`` along ``spatial_dims``, then the linear map
    over the last (channel) dim. (..., H, W, C_in) -> (..., fH, fW, C_out)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, factor: int, spatial_dims: Sequence[int]) -> "UpsampledLinear":
        return _share(cls, linear, factor, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [x.shape[d] * self.factor for d in self.spatial_dims]
        return F.linear(ideal_resample(x, size, self.spatial_dims), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ideal_up={self.factor}, spatial_dims={self.spatial_dims}"


class DownsampledLinear(GraphLeaf, nn.Linear):
    """y = D_f(W x + b): the linear map, then ideal low-pass and down-sampling by ``factor``.
    (..., fH, fW, C_in) -> (..., H, W, C_out)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, factor: int, spatial_dims: Sequence[int]) -> "DownsampledLinear":
        return _share(cls, linear, factor, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        size = [y.shape[d] // self.factor for d in self.spatial_dims]
        return ideal_resample(y, size, self.spatial_dims)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ideal_down={self.factor}, spatial_dims={self.spatial_dims}"


class HighRatePolyActivation(PolyActivation):
    """A PolyActivation meant to run between an ``UpsampledLinear`` and a ``DownsampledLinear``
    whose factor is at least (degree + 1) / 2: pointwise here (with ``normalize``, one L4 scale per
    map, taken at the high rate), alias-free as a whole (the audit checks those neighbours in the
    graph)."""

    @classmethod
    def from_poly(cls, act: PolyActivation) -> "HighRatePolyActivation":
        """The same polynomial (coefficients, scales, normalisation), meant for the high rate."""
        train_scale = isinstance(act.in_scale, nn.Parameter)
        new = cls(act.channels, act.degree, act.coef.detach(), in_scale=float(act.in_scale.detach()),
                  out_scale=float(act.out_scale.detach()), train_scale=train_scale, channel_dim=act.channel_dim,
                  normalize=act.normalize, spatial_dims=act.spatial_dims, eps=act.eps)
        return new.to(device=act.coef.device, dtype=act.coef.dtype).train(act.training)


class IdealUpsample(GraphLeaf, nn.Module):
    """Ideal (sinc) up-sampling by an integer ``factor`` of NCHW maps: replaces nearest/bilinear
    up-sampling, whose interpolation kernels leave spectral images of the signal (aliases)."""

    def __init__(self, factor: int | Sequence[int] = 2):
        super().__init__()
        self.factor = (factor, factor) if isinstance(factor, int) else tuple(int(f) for f in factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ideal_resample(x, [x.shape[-2] * self.factor[0], x.shape[-1] * self.factor[1]], (-2, -1))

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class IdealResize(GraphLeaf, nn.Module):
    """Ideal (band-limited) resampling of NCHW maps to the size ``F.interpolate`` would give: ``size``, or
    floor(H s), floor(W s) for a ``scale_factor`` s. Replaces ``nn.Upsample`` / ``F.interpolate`` when the factor
    is not an integer or the size is given (also computed in the graph: an FPN's ``size=skip.shape[-2:]``).
    An input shift (dy, dx) moves the output by (dy H_out / H, dx W_out / W), exactly. Called as the
    function it replaces: ``forward(x, size=None, scale_factor=None, ...)``; arguments given there win
    over the ones stored."""

    takes_call_arguments = True     # the engine calls it with the replaced call's arguments

    def __init__(self, size: int | Sequence[int] | None = None, scale_factor: float | Sequence[float] | None = None):
        super().__init__()
        self.size = size if size is None or isinstance(size, int) else tuple(int(s) for s in size)
        self.scale_factor = scale_factor if scale_factor is None or isinstance(scale_factor, (int, float)) \
            else tuple(float(f) for f in scale_factor)

    @staticmethod
    def output_size(shape: Sequence[int], size=None, scale_factor=None) -> tuple[int, int]:
        """``F.interpolate``'s output size for an input of spatial ``shape``."""
        if size is not None:
            return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if scale_factor is None:
            raise ValueError("IdealResize needs a size or a scale factor")
        f = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        return int(math.floor(shape[0] * f[0])), int(math.floor(shape[1] * f[1]))

    def forward(self, x: torch.Tensor, size=None, scale_factor=None, *args, **kwargs) -> torch.Tensor:
        if size is None and scale_factor is None:
            size, scale_factor = self.size, self.scale_factor
        return ideal_resample(x, self.output_size(x.shape[-2:], size, scale_factor), (-2, -1))

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}"
