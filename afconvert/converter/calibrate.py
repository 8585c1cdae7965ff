"""Re-estimating BatchNorm statistics after conversion (BN recalibration, as after quantisation).

A converted network computes different activations (polynomials instead of ReLU), so the running
statistics its BatchNorms learned on the source network no longer match them exactly. Running a few
batches through the converted model with the BatchNorms (only) in training mode, averaging their
batch statistics, re-estimates them for the converted network (recipe option
``norm.recalibrate``). Off in ``afc``: its scale-equivariant activations keep the scale, so the
source's statistics, which fit real data, still apply, and statistics of noise at one input size
need not fit other sizes (see docs/models.md). BatchNorm at eval stays a per-channel affine map:
still exactly alias-free.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from afconvert.converter.certify import random_input

__all__ = ["recalibrate_batchnorm", "calibration_batches"]


def calibration_batches(data: torch.Tensor | None, input_size: Sequence[int], in_chans: int, batches: int = 4,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """``data`` (N, C, H, W) split into batches, or Gaussian noise with zero Nyquist bins when None."""
    if data is not None:
        return list(torch.split(data, batch_size))
    return [random_input(batch_size, in_chans, input_size, seed=100 + i) for i in range(batches)]


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
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        for x in batches:
            model(x.to(device=device, dtype=dtype))
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, training in modes.items():
            m.training = training
    return len(bns)
