"""Re-estimating BatchNorm statistics after conversion (BN recalibration, as after quantisation).

A converted network computes different activations (polynomials instead of ReLU), so the running
statistics its BatchNorms learned on the source network no longer match them exactly. Running a few
batches through the converted model with the BatchNorms (only) in training mode, averaging their
batch statistics, re-estimates them for the converted network (recipe option
``norm.recalibrate``). Off in ``afc``: its scale-equivariant activations keep the scale, so the
source's statistics, which fit real data, still apply, and statistics of noise at one input size
need not fit other sizes (see docs/models.md). BatchNorm at eval stays a per-channel affine map:
still exactly alias-free.

``match_batchnorm_statistics`` keeps the function and moves the statistics: after a model has been fitted with
its BatchNorms in eval mode (recovery), their running statistics are still the source's, not those of the
inputs they now see, so the same model in training mode (batch statistics) computes something else.
Re-parametrising each BatchNorm to the statistics measured on the data, with weight and bias adjusted to
compensate, leaves the eval-mode function unchanged and makes training mode agree with it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from afconvert.converter.certify import random_input

__all__ = ["recalibrate_batchnorm", "calibration_batches", "match_batchnorm_statistics"]


def calibration_batches(data: torch.Tensor | None, input_size: Sequence[int], in_chans: int, batches: int = 4,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """``data`` (N, C, H, W) split into batches, or Gaussian noise with zero Nyquist bins when None."""
    if data is not None:
        return list(torch.split(data, batch_size))
    return [random_input(batch_size, in_chans, input_size, seed=100 + i) for i in range(batches)]


def _feed(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run every batch through ``model``, moved to the device and floating dtype of its parameters."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for x in batches:
        model(x.to(device=device, dtype=dtype))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running mean/var by their average over ``batches`` (cumulative, not
    momentum). Other layers stay in eval mode; the model's own mode is restored. Returns the number
    of BatchNorm layers re-estimated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        _feed(model, batches)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, training in modes.items():
            m.training = training
    return len(bns)


@torch.no_grad()
def match_batchnorm_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Give every affine BatchNorm the mean mu_d and variance v_d of its input over ``batches`` (the model in
    eval mode) without changing what it computes in eval mode:
    w (x - mu) / sqrt(v + eps) + b = w' (x - mu_d) / sqrt(v_d + eps) + b' with
    w' = w sqrt(v_d + eps) / sqrt(v + eps), b' = b + w (mu_d - mu) / sqrt(v + eps).
    The inputs are measured in one pass: the eval-mode function, hence every BatchNorm's input, does not change.
    Returns the number of BatchNorm layers re-parametrised (those without weight and bias are left as they are)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.affine and m.running_mean is not None]
    if not bns:
        return 0
    sums: dict[nn.Module, list] = {bn: [0, 0.0, 0.0] for bn in bns}

    def measure(bn, args):
        x = args[0].detach().to(torch.float64).transpose(0, 1).reshape(bn.num_features, -1)
        acc = sums[bn]
        acc[0] += x.shape[1]
        acc[1] = acc[1] + x.sum(1)
        acc[2] = acc[2] + x.square().sum(1)

    modes = {m: m.training for m in model.modules()}
    handles = [bn.register_forward_pre_hook(measure) for bn in bns]
    model.eval()
    try:
        _feed(model, batches)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for bn, (n, s1, s2) in sums.items():
        if not n:
            continue
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min(0)
        old_std = (bn.running_var.double() + bn.eps).sqrt()
        new_std = (var + bn.eps).sqrt()
        w = bn.weight.double()
        bn.bias.copy_(bn.bias.double() + w * (mean - bn.running_mean.double()) / old_std)
        bn.weight.copy_(w * new_std / old_std)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return len(bns)
