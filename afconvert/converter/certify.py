"""Empirical checks of a model's logits: how much they move under integer and fractional circular
shifts (``shift_check``), and whether they are finite and bounded at each input size (``numerics_check``)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from afconvert.layers.spectral import fractional_shift, zero_nyquist

__all__ = ["DEFAULT_SHIFTS", "LOGIT_BOUND", "relative_logit_change", "shift_check", "numerics_check",
           "native_input_size", "size_label", "random_input"]

LOGIT_BOUND = 1e4   # |logit| above this on a standard-normal input: the model is numerically unstable

DEFAULT_SHIFTS: tuple[tuple[float, float], ...] = ((1, 0), (0, 1), (3, -2), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75))


def random_input(batch: int, chans: int, size: Sequence[int], dtype=torch.float32, seed: int = 0,
                 device="cpu") -> torch.Tensor:
    """Gaussian noise with its Nyquist bins removed (the only part without a unique sub-pixel shift)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, chans, *size, generator=g, dtype=torch.float64)
    return zero_nyquist(x).to(device=device, dtype=dtype)


def _label(shift: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:g}" if float(s).is_integer() or len(f"{s:g}") < 6 else f"{s:.3f}" for s in shift) + ")"


@torch.no_grad()
def relative_logit_change(model: nn.Module, x: torch.Tensor, shifts: Iterable[Sequence[float]] = DEFAULT_SHIFTS
                          ) -> dict[str, float]:
    """max |f(shift(x)) - f(x)| / max |f(x)| for each shift (band-limited, circular)."""
    y0 = model(x)
    if not torch.isfinite(y0).all():
        return {_label(s): float("nan") for s in shifts}
    scale = y0.abs().max().clamp_min(torch.finfo(y0.dtype).tiny)
    return {_label(s): float((model(fractional_shift(x, *s)) - y0).abs().max() / scale) for s in shifts}


def shift_check(models: dict[str, nn.Module], input_size: Sequence[int], in_chans: int = 3,
                shifts: Iterable[Sequence[float]] = DEFAULT_SHIFTS, dtype=torch.float32, batch: int = 2,
                seed: int = 0) -> dict:
    """The same random input and shifts for each model (e.g. original and converted), side by side."""
    shifts = list(shifts)
    out = {"input_size": list(input_size), "dtype": str(dtype).replace("torch.", ""),
           "shifts": [list(map(float, s)) for s in shifts], "models": {}}
    for label, model in models.items():
        was_training = model.training
        model.eval()
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        own_dtype = p.dtype if p is not None else dtype
        x = random_input(batch, in_chans, input_size, dtype, seed, device)
        try:
            out["models"][label] = relative_logit_change(model.to(dtype), x, shifts)
        finally:
            model.to(own_dtype).train(was_training)
    return out


def native_input_size(model: nn.Module) -> tuple[int, int]:
    """The size a model is meant to run at: timm's ``pretrained_cfg["input_size"]``, else 224 x 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return (int(size[-2]), int(size[-1])) if size else (224, 224)


def size_label(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


@torch.no_grad()
def numerics_check(model: nn.Module, sizes: Iterable[Sequence[int]], in_chans: int = 3, bound: float = LOGIT_BOUND,
                   dtype=torch.float32, batch: int = 1, seed: int = 0) -> dict:
    """max |logit| of ``model`` on standard-normal inputs (Nyquist bins zeroed) at each size.

    ``stable`` is False when some logit is non-finite or above ``bound`` at some size: certified
    alias-free or not, such a model is not usable. A size the model cannot run at (a head that
    flattens a fixed-size map) is recorded as None and not judged. Returns {"dtype", "bound",
    "max_abs_logit": {"HxW": float (inf for non-finite) or None}, "unstable_at": ["HxW", ...], "stable"}."""
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    own_dtype = p.dtype if p is not None else dtype
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "bound": bound, "max_abs_logit": {}}
    try:
        model.to(dtype)
        for size in dict.fromkeys(tuple(int(v) for v in s) for s in sizes):
            try:
                y = model(random_input(batch, in_chans, size, dtype, seed, device))
            except RuntimeError:  # shape errors: this model runs at its own size only
                out["max_abs_logit"][size_label(size)] = None
                continue
            out["max_abs_logit"][size_label(size)] = float(y.abs().max()) if torch.isfinite(y).all() else float("inf")
    finally:
        model.to(own_dtype).train(was_training)
    out["unstable_at"] = [k for k, v in out["max_abs_logit"].items() if v is not None and not v <= bound]
    out["stable"] = not out["unstable_at"]
    return out
