"""The evaluation runner: shift-robustness metrics of one model over a list of images.

* Images: (path, class index) pairs (``afconvert.data`` lists an ImageFolder and maps its class
  folders); each model sees timm's eval transform for it (``--input-size`` overrides the size).
  An unreadable image is skipped and counted (``unreadable`` in the result), not fatal.
* Models: an existing file is an afconvert checkpoint (``afconvert.load``, as saved); anything else
  is a model name resolved as the converter does (``--weights``, ``--no-pretrained``, the offline
  EfficientNet-Lite0 package).
* Metrics and grids: ``afconvert.evaluation.metrics`` and ``afconvert.evaluation.shift_grids``;
  output formatting: ``afconvert.evaluation.report``; the command: ``afconvert.cli.eval``.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from afconvert.data import DataError, data_config, image_mode, open_image
from afconvert.evaluation import METRIC_ALIASES as _ALIASES
from afconvert.evaluation import METRICS
from afconvert.evaluation import metrics as M
from afconvert.evaluation.shift_grids import GridSpec

__all__ = ["EvalError", "EvalImages", "Candidate", "resolve_model", "evaluate_model", "parse_metrics", "METRICS",
           "spread_indices", "num_classes_of", "eval_device"]


class EvalError(DataError):
    """A problem with the evaluation's inputs; the message names the fix."""


# ---------------------------------------------------------------- data



def parse_metrics(spec: str | Sequence[str] | None) -> set[str]:
    """'accuracy,certified,crop' -> set of metric names (aliases: certified, default, all)."""
    items = [spec] if isinstance(spec, str) else list(spec or ["default"])
    out: set[str] = {"accuracy"}
    for item in items:
        for name in filter(None, re.split(r"[\s,]+", item)):
            name = name.lower()
            if name in _ALIASES:
                out.update(_ALIASES[name])
            elif name in METRICS:
                out.add(name)
            else:
                raise EvalError(f"unknown metric '{name}': use {', '.join(METRICS)} or {', '.join(_ALIASES)}")
    return out


def spread_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over range(n) (all when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


class EvalImages(torch.utils.data.Dataset):
    """(standard view, expanded view, target) per image.

    The standard view is exactly timm's eval transform. The expanded view (for crop-shift, K > 0)
    is the same resized image cropped to (H + K) x (W + K) from the standard crop's top-left corner,
    so ``expanded[..., :H, :W]`` equals the standard view and windows move into real content."""

    def __init__(self, samples: Sequence[tuple[Path, int]], data_config: dict, crop: int = 0):
        from timm.data import create_transform
        from torchvision.transforms import CenterCrop, Compose
        self.samples = list(samples)
        self.transform = create_transform(**data_config)
        self.mode = image_mode(data_config)
        self.crop = int(crop)
        ts = list(getattr(self.transform, "transforms", []))
        cut = next((i for i, t in enumerate(ts) if isinstance(t, CenterCrop)), None)
        if cut is None and self.crop:
            raise EvalError(f"crop-shift needs a centre-crop eval transform (crop_mode 'center'), this model's is "
                            f"{self.transform}; fix: drop 'crop' from --metrics")
        if cut is not None:
            self.pre, self.center, self.post = Compose(ts[:cut]), ts[cut], Compose(ts[cut + 1:])
            size = self.center.size
            self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        """The views of image i, or None when it cannot be read (``collate`` drops and counts it)."""
        path, target = self.samples[i]
        img = open_image(path, self.mode)
        if img is None:
            return None
        if not self.crop:
            return self.transform(img), torch.zeros(0), target
        resized = self.pre(img)
        w_r, h_r = resized.size
        h, w = self.size
        top, left = int(round((h_r - h) / 2.0)), int(round((w_r - w) / 2.0))
        room = min(h_r - h - top, w_r - w - left)
        if room < self.crop:
            raise EvalError(f"crop:{self.crop} needs {self.crop} px of image right of and below the standard crop, "
                            f"{path.name} has {max(room, 0)}; fix: --grid crop:{max(room, 0)}")
        expanded = resized.crop((left, top, left + w + self.crop, top + h + self.crop))
        return self.post(self.center(resized)), self.post(expanded), target


    @staticmethod
    def collate(batch: list) -> tuple:
        """Stack the readable items of a batch; the last element counts the unreadable ones."""
        items = [b for b in batch if b is not None]
        skipped = len(batch) - len(items)
        if not items:
            return None, None, None, skipped
        x, xe, y = torch.utils.data.default_collate(items)
        return x, xe, y, skipped


# ---------------------------------------------------------------- models

@dataclass
class Candidate:
    label: str
    model: nn.Module
    source: str


def resolve_model(arg: str, weights: str | None = None, pretrained: bool = True,
                  num_classes: int | None = None) -> Candidate:
    """An afconvert checkpoint, loaded as saved, or a model name built with its weights as the converter
    builds it (``afconvert.sources.resolve``)."""
    from afconvert.sources.resolve import resolve
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    r = resolve(arg, weights=weights, pretrained=pretrained, **kwargs)
    return Candidate(arg, r.model, r.description)


def num_classes_of(model: nn.Module) -> int | None:
    """The model's number of classes: its ``num_classes``, else its last Linear's outputs (None if neither)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    for mod in reversed(list(model.modules())):
        if isinstance(mod, nn.Linear):
            return mod.out_features
    return None


# ---------------------------------------------------------------- runner

class Forward:
    """Calls ``module`` on stacks of images in chunks of at most ``chunk`` (halving on CUDA out-of-memory)
    and counts the predictions and those with non-finite logits."""

    def __init__(self, module: nn.Module, chunk: int, dtype: torch.dtype):
        self.module, self.chunk, self.dtype = module, max(1, int(chunk)), dtype
        self.predictions = 0
        self.nonfinite = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out, i = [], 0
        while i < x.shape[0]:
            try:
                out.append(self.module(x[i:i + self.chunk].to(self.dtype)))
            except torch.cuda.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                self.chunk //= 2
                torch.cuda.empty_cache()
                continue
            i += out[-1].shape[0]
        y = torch.cat(out)
        self.predictions += y.shape[0]
        self.nonfinite += int((~M.finite_rows(y)).sum())
        return y


class _Sums:
    def __init__(self):
        self.n = 0
        self.hits: dict[str, int] = {}
        self.vec: dict[str, torch.Tensor] = {}
        self.cnt: dict[str, torch.Tensor] = {}

    def add(self, key: str, mask: torch.Tensor) -> None:
        self.hits[key] = self.hits.get(key, 0) + int(mask.sum())

    def add_vec(self, key: str, values: torch.Tensor) -> None:
        """Sum of the finite values over images (dim 0), and how many there were."""
        values = values.detach().double().cpu()
        ok = torch.isfinite(values)
        s, c = torch.where(ok, values, torch.zeros_like(values)).sum(0), ok.sum(0)
        self.vec[key] = self.vec[key] + s if key in self.vec else s
        self.cnt[key] = self.cnt[key] + c if key in self.cnt else c

    def pct(self, key: str) -> float | None:
        return 100.0 * self.hits[key] / self.n if key in self.hits and self.n else None

    def mean(self, key: str) -> list[float | None] | None:
        if key not in self.vec:
            return None
        return [float(s / c) if c else None for s, c in zip(self.vec[key], self.cnt[key])]


def eval_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto (cuda when available), with a one-line error for the others."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name}: not a device; fix: cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available here; fix: --device cpu")
    return dev


def _classification_metrics(s: "_Sums", fwd: Forward, model: nn.Module, x: torch.Tensor, xe: torch.Tensor,
                            y: torch.Tensor, label: str, metrics: set[str], grids: GridSpec, gen: dict, chunk: int,
                            ts: list) -> None:
    """Add one batch's classification metrics (top-1/5, certified grids, consistency, crop-shift, the logit
    change curve, per-stage equivariance) to ``s``."""
    device, dtype = x.device, x.dtype
    logits = fwd(x)
    n_cls = logits.shape[-1]
    if int(y.max()) >= n_cls:
        raise EvalError(f"class index {int(y.max())} but {label} has {n_cls} classes; fix: check the "
                        f"class folders / --class-map")
    s.n += x.shape[0]
    top1 = M.topk_correct(logits, y, 1)
    s.add("top1", top1)
    s.add("top5", M.topk_correct(logits, y, 5))
    s.add("finite", M.finite_rows(logits))
    for name in ("integer", "half", "fractional"):
        if name in metrics:
            s.add(name, M.certified_correct(fwd, x, y, getattr(grids, name), chunk=chunk, correct=top1))
    if "bilinear" in metrics:
        s.add("bilinear", M.certified_correct(fwd, x, y, grids.bilinear, "bilinear", chunk, correct=top1))
    if "consistency" in metrics:
        s.add("cons_int", M.consistency_same(fwd, x, grids.consistency, False, gen["int"], chunk)[0])
        s.add("cons_frac", M.consistency_same(fwd, x, grids.consistency, True, gen["frac"], chunk)[0])
    if "crop" in metrics:
        ok = M.crop_shift_correct(fwd, xe.to(device=device, dtype=dtype), y, x.shape[-2:], grids.crop, chunk)
        s.add_vec("crop", ok.double().mean(1))
        s.add("crop_certified", ok.flatten(1).all(1))
    if "curve" in metrics:
        diag = [(t, t) for t in ts]
        s.add_vec("curve_band", M.logit_change(fwd, x, diag, "band_limited", chunk))
        s.add_vec("curve_bilinear", M.logit_change(fwd, x, diag, "bilinear", chunk))
    if "equivariance" in metrics:
        diffs = M.equivariance_diff(fwd, x, grids.equivariance, module=model)
        for k, v in diffs.items():
            s.add_vec("eq:" + k, v.view(-1, 1))


@torch.no_grad()
def _dense(model: nn.Module, x: torch.Tensor, label: str, metrics: set[str]) -> bool:
    """True when ``model`` does not return (B, K) logits (a backbone, a segmentation net, several outputs):
    then only the per-output ``equivariance`` metric applies."""
    y = model(x[:1])
    if torch.is_tensor(y) and y.dim() == 2:
        return False
    if metrics - {"equivariance", "accuracy"} or "equivariance" not in metrics:
        raise EvalError(f"{label} returns feature maps or several outputs, not logits: only the per-output "
                        f"equivariance metric applies; fix: --metrics equivariance")
    return True


def evaluate_model(cand: Candidate, samples: Sequence[tuple[Path, int]], metrics: set[str], grids: GridSpec,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8,
                   forward_batch: int | None = None, seed: int = 0, input_size: int | None = None,
                   progress: bool | None = None, workers: int = 0) -> dict:
    """Run ``metrics`` for one model over ``samples`` [(path, class index)]; returns its result dict."""
    from tqdm import tqdm
    device = torch.device(device)
    model = cand.model.to(device=device, dtype=dtype).eval()
    cfg = data_config(model, input_size)
    crop = grids.crop if "crop" in metrics else 0
    ds = EvalImages(samples, cfg, crop)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=EvalImages.collate)
    chunk = forward_batch or (batch_size if device.type == "cpu" else 4 * batch_size)
    fwd = Forward(model, chunk, dtype)
    gen = {"int": torch.Generator().manual_seed(seed), "frac": torch.Generator().manual_seed(seed + 1)}
    s = _Sums()
    ts = grids.curve_shifts()
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=cand.label, unit="batch", file=sys.stderr, leave=False,
               disable=None if progress is None else not progress)
    unreadable, dense = 0, None
    for x, xe, y, skipped in bar:
        unreadable += skipped
        if x is None:
            continue
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        dense = _dense(model, x, cand.label, metrics) if dense is None else dense
        if dense:                                       # feature maps or several outputs: per-output equivariance
            s.n += x.shape[0]
            diffs = M.output_equivariance(model, x, grids.equivariance)
            s.add("finite", torch.stack([torch.isfinite(v) for v in diffs.values()]).all(0))
            for k, v in diffs.items():
                s.add_vec("eq:" + k, v.view(-1, 1))
            continue
        _classification_metrics(s, fwd, model, x, xe, y, cand.label, metrics, grids, gen, chunk, ts)
    wall = time.perf_counter() - t0
    if s.n == 0:
        raise EvalError(f"no images were evaluated ({unreadable} unreadable); fix: check --data and --limit")

    def pct(key, name):
        return s.pct(key) if name in metrics else None

    result = {
        "model": cand.label, "source": cand.source, "images": s.n,
        "accuracy": s.pct("top1"), "accuracy_top5": s.pct("top5"),
        "certified_integer": pct("integer", "integer"), "certified_half": pct("half", "half"),
        "certified_fractional": pct("fractional", "fractional"),
        "consistency": pct("cons_int", "consistency"), "consistency_fractional": pct("cons_frac", "consistency"),
        "certified_bilinear": pct("bilinear", "bilinear"),
        "crop_shift": None, "logit_change": None, "equivariance": None,
        "nonfinite": 100.0 * fwd.nonfinite / fwd.predictions if fwd.predictions else 0.0,
        "nonfinite_images": s.n - s.hits["finite"], "nonfinite_predictions": fwd.nonfinite,
        "predictions": fwd.predictions, "unreadable": unreadable, "wall_time_s": wall, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "input_size": list(cfg["input_size"][1:]),
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }
    if "crop" in metrics:
        result["crop_shift"] = {"k": list(range(grids.crop + 1)), "accuracy": [None if v is None else 100 * v
                                                                               for v in s.mean("crop")],
                                "certified": s.pct("crop_certified")}
    if "curve" in metrics:
        result["logit_change"] = {"t": ts, "band_limited": s.mean("curve_band"), "bilinear": s.mean("curve_bilinear")}
    if "equivariance" in metrics:
        result["equivariance"] = {k[3:]: s.mean(k)[0] for k in s.vec if k.startswith("eq:")}
    result["grids"] = _grids_used(grids, metrics)
    return result


def _grids_used(grids: GridSpec, metrics: set[str]) -> dict:
    """The grids of the metrics that ran (each metric's grid has the metric's name)."""
    return {k: v for k, v in grids.to_dict().items() if k in metrics}


