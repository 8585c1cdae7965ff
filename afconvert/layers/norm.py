"""The alias-free LayerNorm (the paper's "CHW2").

A per-pixel LayerNorm divides each pixel by its own standard deviation: a pointwise
nonlinearity that creates harmonics. The alias-free form subtracts the per-pixel channel mean
(linear and pointwise: no new frequencies) and divides by one standard deviation per sample,
taken over C, H and W (invariant to circular shifts, fractional ones included, by Parseval):

    u = mean_C(x),  s^2 = mean_{C,H,W}((x - u)^2),  y = w * (x - u) / sqrt(s^2 + eps) + b
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from afconvert.layers.graph_leaf import GraphLeaf
from afconvert.layers.spectral import promote_half

__all__ = ["AliasFreeLayerNorm"]


class AliasFreeLayerNorm(GraphLeaf, nn.Module):
    """LayerNorm with the mean over channels and the variance over channels and space.

    ``channel_dim``: where C sits (1 for NCHW, -1 for NHWC); ``spatial_dims``: H and W.
    Parameters ``weight``/``bias`` of shape (C,), named as in ``nn.LayerNorm`` so its
    checkpoints load unchanged.
    """

    def __init__(self, channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 channel_dim: int = 1, spatial_dims: Sequence[int] = (2, 3)):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.channel_dim, self.spatial_dims = channel_dim, tuple(spatial_dims)
        self.weight = nn.Parameter(torch.ones(channels)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if elementwise_affine and bias else None

    @classmethod
    def from_layernorm(cls, norm: nn.Module, channel_dim: int, spatial_dims: Sequence[int]) -> "AliasFreeLayerNorm":
        """Share the parameters of an ``nn.LayerNorm`` (or a subclass such as timm's LayerNorm2d)."""
        shape = tuple(norm.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"only a LayerNorm over one (channel) dim converts, got normalized_shape={shape}")
        new = cls(shape[0], norm.eps, elementwise_affine=False, channel_dim=channel_dim, spatial_dims=spatial_dims)
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, promote_half(x)            # float32 under autocast: the variance needs range
        cd = self.channel_dim % x.ndim
        u = x.mean(cd, keepdim=True)
        xc = x - u
        var = xc.pow(2).mean((cd, *[d % x.ndim for d in self.spatial_dims]), keepdim=True)
        y = xc * torch.rsqrt(var + self.eps)
        shape = [1] * x.ndim
        shape[cd] = self.channels
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, channel_dim={self.channel_dim}, spatial_dims={self.spatial_dims}"
