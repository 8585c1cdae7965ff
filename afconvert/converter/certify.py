"""Empirical checks of a model's outputs: how much they move under integer and fractional circular shifts
(``shift_check``), and whether they are finite and bounded at each input size (``numerics_check``).

A model may return a tensor or any nesting of tuples, lists and dicts of tensors (``output_leaves``: each by
its path). An output that is spatially constant (logits, pooled features) should not move at all; a spatial
map (H_out, W_out) computed from an (H, W) input should move with the input: by (dy H_out / H, dx W_out / W)
for an input shift (dy, dx), band-limited and circular (stride r = H / H_out: a shift of d / r).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from afconvert.converter.layout import Layout, layout_of
from afconvert.layers.spectral import fractional_shift, zero_nyquist

__all__ = ["evaluating", "DEFAULT_SHIFTS", "LOGIT_BOUND", "MEASURE_SHIFTS", "MEASURE_TOLERANCE", "measure_invariance",
           "relative_change", "relative_logit_change", "shift_error",
           "shift_check", "numerics_check", "native_input_size", "size_label", "random_input", "output_leaves", "output_layouts", "expected_shift"]

LOGIT_BOUND = 1e4   # |logit| above this on a standard-normal input: the model is numerically unstable

DEFAULT_SHIFTS: tuple[tuple[float, float], ...] = ((1, 0), (0, 1), (3, -2), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75))

# The measurement that backs a certificate (``measure_invariance``): an integer shift that no stride of 2 or 4
# divides, a half-pixel one and a general fractional one, in float64. An exactly alias-free network moves by
# float64 rounding, 1e-16 to 1e-12 of its largest output in the tests' models; the smallest real aliasing this
# project has seen is 1e-4 (AlexNet's head). 1e-8 leaves four orders on each side (float32 rounding alone
# reaches 1e-6 in deep networks, too close to the aliasing to tell them apart).
MEASURE_SHIFTS: tuple[tuple[float, float], ...] = ((3, -2), (0.5, 0.5), (1 / 3, 2 / 3))
MEASURE_TOLERANCE = 1e-8


def random_input(batch: int, chans: int, size: Sequence[int], dtype=torch.float32, seed: int = 0,
                 device="cpu") -> torch.Tensor:
    """Gaussian noise with its Nyquist bins removed (the only part without a unique sub-pixel shift)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, chans, *size, generator=g, dtype=torch.float64)
    return zero_nyquist(x).to(device=device, dtype=dtype)


def _label(shift: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:g}" if float(s).is_integer() or len(f"{s:g}") < 6 else f"{s:.3f}" for s in shift) + ")"


def output_leaves(y, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a model's output by its path: ``{"": y}`` for a tensor; ``"0"``, ``"1"``, ... for a
    tuple or list; the keys for a dict, nested as ``"1.stem"``. Anything else is left out."""
    if torch.is_tensor(y):
        return {path: y}
    if isinstance(y, dict):
        items = y.items()
    elif isinstance(y, (tuple, list)):
        items = enumerate(y)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(output_leaves(v, f"{path}.{k}" if path else str(k)))
    return out


@torch.no_grad()
def output_layouts(model: nn.Module, x: torch.Tensor) -> dict[str, Layout | None]:
    """The ``Layout`` of each output of ``model`` on inputs of ``x``'s size, (2H, W) and (H, 2W) (None where
    the model does not run at the larger sizes: its outputs are then taken as they are at ``x``'s size)."""
    base = {k: (tuple(v.shape), v.dtype) for k, v in output_leaves(model(x)).items()}
    h, w = x.shape[-2:]
    runs = []
    for size in ((2 * h, w), (h, 2 * w)):
        try:
            y = model(torch.zeros(*x.shape[:-2], *size, dtype=x.dtype, device=x.device))
            runs.append({k: (tuple(v.shape), v.dtype) for k, v in output_leaves(y).items()})
        except RuntimeError:
            runs.append(base)
    return {k: layout_of(v, runs[0].get(k, v), runs[1].get(k, v)) for k, v in base.items()}


def expected_shift(y: torch.Tensor, layout: Layout | None, shift: Sequence[float], input_size: Sequence[int]
                   ) -> torch.Tensor:
    """What output ``y`` becomes when the input of ``input_size`` moves by ``shift``, if the model is
    invariant (spatially constant outputs: ``y`` itself) or equivariant (spatial maps: ``y`` moved by the
    shift times H_out / H, W_out / W)."""
    if layout is None or layout.spatial_dims is None:
        return y
    hd, wd = layout.spatial_dims
    dy = float(shift[0]) * y.shape[hd] / input_size[0]
    dx = float(shift[1]) * y.shape[wd] / input_size[1]
    return fractional_shift(y, dy, dx, dims=(hd, wd))


@torch.no_grad()
def relative_change(y: torch.Tensor, ref: torch.Tensor, scale: str = "max") -> float:
    """max |y - ref| / s, the one measure of how far outputs moved: s = max |ref| (``"max"``) or, for a batch
    of logits (B, K), the mean over the K logits of their standard deviation over the B images (``"spread"``:
    how much the logits vary between images, blind to an offset common to all images)."""
    if scale == "max":
        s = ref.abs().max()
    elif scale == "spread":
        s = ref.std(0).mean()
    else:
        raise ValueError(f"scale must be 'max' or 'spread', got '{scale}'")
    return float((y - ref).abs().max() / s.clamp_min(torch.finfo(ref.dtype).tiny))


@torch.no_grad()
def relative_logit_change(model: nn.Module, x: torch.Tensor, shifts: Iterable[Sequence[float]] = DEFAULT_SHIFTS,
                          per_output: dict | None = None, scale: str = "max", y0=None) -> dict[str, float]:
    """For each shift: max over the outputs of ``relative_change(f(shift(x)), expected, scale)``, ``expected``
    being the output itself (spatially constant outputs) or its own shift (spatial maps, ``expected_shift``).
    With ``per_output`` (a dict), also each output's value per shift, under its path. ``y0``: f(x), if known."""
    shifts = list(shifts)
    y0 = output_leaves(model(x) if y0 is None else y0)
    if not y0 or not all(torch.isfinite(v).all() for v in y0.values()):
        return {_label(s): float("nan") for s in shifts}
    layouts = output_layouts(model, x) if any(v.dim() > 2 for v in y0.values()) else {}
    result = {}
    for s in shifts:
        y = output_leaves(model(fractional_shift(x, *s)))
        change = {k: relative_change(y[k], expected_shift(v, layouts.get(k), s, x.shape[-2:]), scale)
                  for k, v in y0.items()}
        result[_label(s)] = max(change.values())
        if per_output is not None:
            for k, v in change.items():
                per_output.setdefault(k or "output", {})[_label(s)] = v
    return result


def shift_error(model: nn.Module, x: torch.Tensor, shifts: Iterable[Sequence[float]] = DEFAULT_SHIFTS,
                scale: str = "max", y0=None) -> float:
    """The largest ``relative_logit_change`` over ``shifts`` (nan if an output is not finite)."""
    return max(relative_logit_change(model, x, shifts, scale=scale, y0=y0).values())


@contextlib.contextmanager
def evaluating(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[torch.device]:
    """``model`` in eval mode (and in ``dtype``, if given) inside the block, its mode and dtype restored after;
    yields the device of its parameters (cpu for a model without any)."""
    was_training = model.training
    p = next(model.parameters(), None)
    own_dtype = p.dtype if p is not None else None
    try:
        model.eval()
        if dtype is not None:
            model.to(dtype)
        yield p.device if p is not None else torch.device("cpu")
    finally:
        if own_dtype is not None:
            model.to(own_dtype)
        model.train(was_training)


def shift_check(models: dict[str, nn.Module], input_size: Sequence[int], in_chans: int = 3,
                shifts: Iterable[Sequence[float]] = DEFAULT_SHIFTS, dtype=torch.float32, batch: int = 2,
                seed: int = 0) -> dict:
    """The same random input and shifts for each model (e.g. original and converted), side by side."""
    shifts = list(shifts)
    out = {"input_size": list(input_size), "dtype": str(dtype).replace("torch.", ""),
           "shifts": [list(map(float, s)) for s in shifts], "models": {}}
    for label, model in models.items():
        per_output: dict = {}
        with evaluating(model, dtype) as device:
            x = random_input(batch, in_chans, input_size, dtype, seed, device)
            out["models"][label] = relative_logit_change(model, x, shifts, per_output)
        if len(per_output) > 1:
            out.setdefault("outputs", {})[label] = per_output
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
    """max |output| of ``model`` (over every output tensor) on standard-normal inputs (Nyquist bins zeroed) at
    each size.

    ``stable`` is False when some logit is non-finite or above ``bound`` at some size: certified
    alias-free or not, such a model is not usable. A size the model cannot run at (a head that
    flattens a fixed-size map) is recorded as None and not judged. Returns {"dtype", "bound",
    "max_abs_logit": {"HxW": float (inf for non-finite) or None}, "unstable_at": ["HxW", ...], "stable"}."""
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "bound": bound, "max_abs_logit": {}}
    with evaluating(model, dtype) as device:
        for size in dict.fromkeys(tuple(int(v) for v in s) for s in sizes):
            try:
                y = model(random_input(batch, in_chans, size, dtype, seed, device))
            except RuntimeError:  # shape errors: this model runs at its own size only
                out["max_abs_logit"][size_label(size)] = None
                continue
            leaves = list(output_leaves(y).values())
            finite = all(torch.isfinite(v).all() for v in leaves)
            out["max_abs_logit"][size_label(size)] = max(float(v.abs().max()) for v in leaves) if finite and leaves \
                else float("inf")
    out["unstable_at"] = [k for k, v in out["max_abs_logit"].items() if v is not None and not v <= bound]
    out["stable"] = not out["unstable_at"]
    return out


def measure_invariance(model: nn.Module, input_size: Sequence[int], in_chans: int = 3,
                       shifts: Iterable[Sequence[float]] = MEASURE_SHIFTS, tolerance: float = MEASURE_TOLERANCE,
                       batch: int = 1, seed: int = 1) -> dict:
    """The measurement half of a certificate: in float64 at ``input_size``, each output's largest relative change
    (``relative_change``, of its largest value) from what exact alias-freeness predicts (the output itself, or
    its own shift for a map) over ``shifts``. Returns {"input_size", "dtype", "shifts", "tolerance", "worst",
    "output", "shift" (where the worst was), "agrees" (worst <= tolerance), "error" (why it could not measure,
    or None)}."""
    shifts = [tuple(map(float, s)) for s in shifts]
    out = {"input_size": [int(v) for v in input_size], "dtype": "float64", "shifts": [list(s) for s in shifts],
           "tolerance": tolerance, "worst": None, "output": None, "shift": None, "agrees": False, "error": None}
    per_output: dict = {}
    try:
        with evaluating(model, torch.float64) as device:
            x = random_input(batch, in_chans, input_size, torch.float64, seed, device)
            with torch.no_grad():
                relative_logit_change(model, x, shifts, per_output)
    except Exception as exc:  # any failure to measure leaves the certificate unbacked
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return out
    if not per_output:
        out["error"] = "outputs not finite in float64"
        return out
    name, label, worst = max(((k, lab, v) for k, per in per_output.items() for lab, v in per.items()),
                             key=lambda t: t[2] if t[2] == t[2] else float("inf"))
    out.update(worst=worst, output=name, shift=label, agrees=bool(worst <= tolerance))
    return out
