"""Re-estimating BatchNorm statistics after conversion (BN recalibration, as after quantisation).

A converted network computes different activations (polynomials instead of ReLU), so the running
statistics its BatchNorms learned on the source network no longer match them exactly. Running a few
batches through the converted model with the BatchNorms (only) in training mode, averaging their
batch statistics, re-estimates them for the converted network (recipe option
``norm.recalibrate``). Off in ``afc``: its scale-equivariant activations keep the scale, the
source's statistics fit real data, and statistics of noise at one size made plain-polynomial
networks explode at other sizes. BatchNorm at eval stays a per-channel affine map: still exactly
alias-free. Also: the calibration images (``load_calibration_images``) that activation fits use.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .shift_check import random_input

__all__ = ["recalibrate_batchnorm", "calibration_batches", "load_calibration_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_calibration_images(folder, model: nn.Module, input_size: Sequence[int], limit: int = 64) -> torch.Tensor:
    """Up to ``limit`` images found under ``folder``, with the model's own timm eval transform
    (resize, centre crop to ``input_size``, its mean/std): (N, C, H, W)."""
    from pathlib import Path

    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; fix: point --calibration "
                                f"at a folder of images like the ones the model will see")
    config = resolve_data_config({"input_size": (3, *input_size), "crop_pct": 1.0}, model=model)
    transform = create_transform(**config)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


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
