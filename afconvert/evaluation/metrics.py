"""Shift-robustness metrics of an image classifier (Michaeli et al., CVPR 2023; Zhang, ICML 2019).

Every function takes ``model`` (any callable images -> logits, e.g. an ``nn.Module`` in eval mode)
and one batch: images ``x`` (B, C, H, W) and integer class targets (B,), and returns per-image results
(``afconvert.evaluation.runner`` sums them over a dataset).

Conventions shared by all metrics:

* **Prediction**: the top-1 class (argmax of the logits). A row of logits with any non-finite
  value (inf/nan: e.g. a numerically unstable model) is *no
  prediction*: it is counted wrong, and it never agrees with another prediction.
* **Shifts** are circular: ``y[n] = x[n - d]`` via ``afconvert.fractional_shift`` (band-limited;
  integer shifts are exactly ``torch.roll``).
* **Band limit**: the certified, consistency, equivariance and band-limited curve metrics shift
  ``P(x) = zero_nyquist(x)``, the image without its Nyquist bins: a signal with energy in a Nyquist
  bin has no unique fractional shift, so "the image shifted by 1/2 pixel" is only defined for
  ``P(x)``. Grids of integer shifts only (certified integer, integer consistency) shift the raw image:
  an integer circular shift is defined for any image. Plain accuracy, crop-shift and bilinear metrics
  use the raw image.
* Shifted copies of one batch are stacked into calls of up to ``chunk`` images (several shifts
  per model call); images already failed are not evaluated again.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from afconvert.converter.certify import expected_shift, output_layouts, output_leaves
from afconvert.layers.spectral import fractional_shift, zero_nyquist

__all__ = [
    "finite_rows", "predict", "topk_correct", "band_limit", "output_equivariance", "bilinear_shift", "certified_correct",
    "consistency_same", "equivariance_diff", "stage_layers", "crop_windows", "crop_shift_correct",
    "logit_change"]

Model = Callable[[torch.Tensor], torch.Tensor]
Shift = Sequence[float]


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows whose logits are all finite."""
    return torch.isfinite(logits).all(dim=-1)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """(B,) top-1 class; -1 for a row with any non-finite logit (no prediction)."""
    pred = logits.argmax(dim=-1)
    return torch.where(finite_rows(logits), pred, torch.full_like(pred, -1))


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(B,) bool: the target is among the k largest logits (and every logit is finite)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == target.to(top.device).view(-1, 1)).any(dim=-1) & finite_rows(logits)


def band_limit(x: torch.Tensor) -> torch.Tensor:
    """P(x): the image without its Nyquist bins (even sizes), the part with a unique sub-pixel shift."""
    return zero_nyquist(x)


def bilinear_shift(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """Circular shift by bilinear interpolation: y[n] = (1 - a) x[n - i] + a x[n - i - 1] per axis,
    where d = i + a, 0 <= a < 1. Not band-limited: a realistic sub-pixel resampling kernel."""
    out = x
    for d, dim in ((float(dy), -2), (float(dx), -1)):
        i = math.floor(d)
        a = d - i
        out = torch.roll(out, i, dim) if i else out
        if a:
            out = (1 - a) * out + a * torch.roll(out, 1, dim)
    return out


_SHIFTERS = {"band_limited": fractional_shift, "bilinear": bilinear_shift}


def _shifter(method: str):
    try:
        return _SHIFTERS[method]
    except KeyError:
        raise ValueError(f"unknown shift method '{method}': use one of {', '.join(_SHIFTERS)}") from None


@torch.no_grad()
def certified_correct(model: Model, x: torch.Tensor, target: torch.Tensor, shifts: Iterable[Shift],
                      method: str = "band_limited", chunk: int = 64,
                      correct: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: certified correct = correct on x AND on shift(base, d) for every d in ``shifts``.

    ``base`` is P(x) for ``method='band_limited'`` (fractional_shift) with any non-integer shift, the raw x
    for integer shifts only and for ``'bilinear'`` (bilinear_shift). ``correct`` is the plain top-1
    correctness on x if already known.
    """
    shift = _shifter(method)
    shifts = [tuple(map(float, s)) for s in shifts]
    target = target.to(x.device)
    alive = (topk_correct(model(x), target) if correct is None else correct.clone()).to(x.device)
    integer = all(v == int(v) for s in shifts for v in s)
    base = band_limit(x) if method == "band_limited" and not integer else x
    i = 0
    while i < len(shifts) and bool(alive.any()):
        idx = alive.nonzero().flatten()
        group = shifts[i:i + max(1, chunk // idx.numel())]
        xa = base[idx]
        views = torch.cat([shift(xa, *s) for s in group])
        pred = predict(model(views)).view(len(group), idx.numel())
        ok = (pred == target[idx].view(1, -1)).all(dim=0)
        alive[idx[~ok]] = False
        i += len(group)
    return alive


def _random_shifts(n: int, max_shift: float, fractional: bool, generator: torch.Generator | None) -> torch.Tensor:
    """(n, 2, 2): two (dy, dx) per image; integers uniform in -R..R, or reals uniform in [-R, R]."""
    if fractional:
        return (torch.rand(n, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1) * max_shift
    return torch.randint(-int(max_shift), int(max_shift) + 1, (n, 2, 2), generator=generator).double()


@torch.no_grad()
def consistency_same(model: Model, x: torch.Tensor, max_shift: float = 32, fractional: bool = False,
                     generator: torch.Generator | None = None, chunk: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift consistency of each image: do two random shifts of P(x) (of x for integer shifts) give the same
    top-1?

    Each image gets its own fresh pair of shifts (integer dy, dx uniform in -R..R, or real uniform
    in [-R, R] with ``fractional``). Returns ((B,) bool same, (B, 2, 2) the shifts used).
    Two non-finite predictions do not agree.
    """
    b = x.shape[0]
    shifts = _random_shifts(b, max_shift, fractional, generator)
    base = band_limit(x) if fractional else x
    views = torch.cat([fractional_shift(base[i:i + 1], *shifts[i, j].tolist()) for j in range(2) for i in range(b)])
    logits = torch.cat([model(views[s:s + chunk]) for s in range(0, views.shape[0], max(1, chunk))])
    pred = predict(logits).view(2, b)
    return (pred[0] == pred[1]) & (pred[0] >= 0), shifts


def stage_layers(module: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the model's stages: timm's ``feature_info`` if present,
    else every top-level child (those that do not output a spatial map are skipped at run time)."""
    info = getattr(module, "feature_info", None)
    if info:
        names = [f["module"] if isinstance(f, dict) else getattr(f, "module", None) for f in info]
        names = [n for n in names if n]
        if names:
            return names
    return [name for name, _ in module.named_children()]


def _equivariance_diff(y0: torch.Tensor, y1: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's diff per image: mean |y0 - y1| / (max(|y0|, |y1|) + eps) over every other dim, (B,) float64."""
    return ((y0 - y1).abs() / (torch.maximum(y0.abs(), y1.abs()) + eps)).flatten(1).mean(dim=1).double()


@torch.no_grad()
def equivariance_diff(model: Model, x: torch.Tensor, shifts: Iterable[Shift], layers: Sequence[str] | None = None,
                      eps: float = 1e-6, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Shift-equivariance diff per stage and image, averaged over ``shifts`` (the paper's definition):

        diff = 1/(C H W) * sum_{c,i,j} |y0 - y1| / (max(|y0|, |y1|) + eps)

    y0 = features(shift(P(x), d)): the features of the shifted input; y1 = shift(features(P(x)), d'):
    the shifted features, by the same band-limited shift rescaled to the feature map, d' = d * h / H
    (a stride-s stage moves by d / s pixels). Hooks go on ``module`` (default ``model``); ``layers``
    default to ``stage_layers``; outputs that are not (B, C, h, w) maps with h * w > 1 are skipped.
    Returns {layer: (B,) diff}; nan where features are non-finite.
    """
    module = model if module is None else module
    names = list(layers) if layers is not None else stage_layers(module)
    mods = dict(module.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(module).__name__}; fix: pass layer names "
                         f"from model.named_modules()")
    captured: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
                captured.setdefault(name, []).append(out.detach())
        return fn

    def features(inp: torch.Tensor) -> dict[str, torch.Tensor]:
        captured.clear()
        model(inp)
        return {k: torch.cat(v) for k, v in captured.items()}

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        base = band_limit(x)
        f0 = features(base)
        h_in, w_in = x.shape[-2:]
        sums = {k: torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) for k in f0}
        shifts = [tuple(map(float, s)) for s in shifts]
        for dy, dx in shifts:
            f1 = features(fractional_shift(base, dy, dx))
            for k, y_ref in f0.items():
                h, w = y_ref.shape[-2:]
                y1 = fractional_shift(y_ref, dy * h / h_in, dx * w / w_in)
                sums[k] += _equivariance_diff(f1[k], y1, eps)
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(1, len(shifts)) for k, v in sums.items()}


@torch.no_grad()
def output_equivariance(model: nn.Module, x: torch.Tensor, shifts: Iterable[Shift], eps: float = 1e-6
                        ) -> dict[str, torch.Tensor]:
    """The paper's equivariance diff on a model's own outputs (a backbone's feature maps, a segmentation net's
    logits; any output structure, ``output_leaves``), per output and image, averaged over ``shifts``:
    y0 = the output of the shifted input, y1 = the output shifted by the same band-limited shift rescaled to
    the output (d H_out / H; spatially constant outputs: not shifted), diff = mean |y0 - y1| / (max(|y0|,
    |y1|) + eps). Returns {output path ("output" for a lone tensor): (B,) diff}; nan where non-finite."""
    base = band_limit(x)
    ref = output_leaves(model(base))
    layouts = output_layouts(model, base[:1])
    sums = {k: torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) for k in ref}
    shifts = [tuple(map(float, s)) for s in shifts]
    for d in shifts:
        moved = output_leaves(model(fractional_shift(base, *d)))
        for k, y_ref in ref.items():
            sums[k] += _equivariance_diff(moved[k], expected_shift(y_ref, layouts.get(k), d, x.shape[-2:]), eps)
    return {(k or "output"): v / max(1, len(shifts)) for k, v in sums.items()}


def crop_windows(max_shift: int) -> list[tuple[int, int]]:
    """Window offsets (top, left) of the crop-shift metric: (0, 0), then (k, 0) and (0, k) for k = 1..K."""
    return [(0, 0)] + [w for k in range(1, max_shift + 1) for w in ((k, 0), (0, k))]


@torch.no_grad()
def crop_shift_correct(model: Model, expanded: torch.Tensor, target: torch.Tensor, size: Sequence[int],
                       max_shift: int, chunk: int = 64) -> torch.Tensor:
    """Camera-translation robustness: (B, 2, K + 1) bool, correct when the H x W crop window over the
    larger image ``expanded`` (B, C, H + K, W + K) starts at (k, 0) [dim 1 = 0: moved down] or (0, k)
    [dim 1 = 1: moved right], k = 0..K. No wrap-around: every window is real image content.
    Window (0, 0) is the standard view (column k = 0 of both rows)."""
    h, w = int(size[0]), int(size[1])
    if expanded.shape[-2] < h + max_shift or expanded.shape[-1] < w + max_shift:
        raise ValueError(f"crop-shift needs images of at least {h + max_shift} x {w + max_shift} for K = {max_shift}, "
                         f"got {tuple(expanded.shape[-2:])}")
    windows = crop_windows(max_shift)
    b = expanded.shape[0]
    target = target.to(expanded.device)
    out = torch.zeros(b, 2, max_shift + 1, dtype=torch.bool, device=expanded.device)
    per = max(1, chunk // b)
    for s in range(0, len(windows), per):
        group = windows[s:s + per]
        views = torch.cat([expanded[..., t:t + h, l:l + w] for t, l in group])
        ok = (predict(model(views)).view(len(group), b) == target.view(1, -1))
        for j, (t, l) in enumerate(group):
            if t == 0 and l == 0:
                out[:, :, 0] = ok[j].view(-1, 1)
            elif l == 0:
                out[:, 0, t] = ok[j]
            else:
                out[:, 1, l] = ok[j]
    return out


@torch.no_grad()
def logit_change(model: Model, x: torch.Tensor, shifts: Iterable[Shift], method: str = "band_limited",
                 chunk: int = 64) -> torch.Tensor:
    """(B, S) relative logit change ||f(shift(base, d)) - f(base)||_2 / ||f(base)||_2 for each shift d,
    base = P(x) (band-limited) or x (bilinear); nan where logits are non-finite."""
    shift = _shifter(method)
    base = band_limit(x) if method == "band_limited" else x
    shifts = [tuple(map(float, s)) for s in shifts]
    b = x.shape[0]
    ref = model(base)
    out = []
    per = max(1, chunk // b)
    for s in range(0, len(shifts), per):
        group = shifts[s:s + per]
        y = model(torch.cat([shift(base, *d) for d in group])).view(len(group), b, -1)
        out.append(((y - ref).double().norm(dim=-1) / ref.double().norm(dim=-1)).T)
    res = torch.cat(out, dim=1) if out else torch.zeros(b, 0, dtype=torch.float64)
    bad = ~finite_rows(ref)
    res[bad] = float("nan")
    return torch.where(torch.isfinite(res), res, torch.full_like(res, float("nan")))
