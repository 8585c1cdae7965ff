"""``afconvert eval``: shift-robustness of one or more models on an ImageFolder, in one command.

    afconvert eval efficientnet_lite0 lite0_af.pt --data photos/ [--grid paper] [--json] [--plot f.png]

* Data: ``DIR/<class folder>/<image>``; each model sees timm's eval transform for it (resize,
  centre crop, normalise; ``--input-size`` overrides the size). A class folder maps to the
  model's class index through ``--class-map FILE`` (timm's convention: line i names the folder of
  class i), or its own name when every folder is an integer (``281/``), or ImageNet synset order
  when every folder is a WordNet id (``n02123159/``) and the model has 1000 classes. Sorted
  folder order (torchvision's ImageFolder) is used only when the folders are exactly the model's
  classes in number; a subset of classes must say which classes it holds.
* Models: an existing file is an afconvert checkpoint (``afconvert.load``, as saved); anything else
  is a model name resolved as the converter does (``--weights``, ``--no-pretrained``, the offline
  EfficientNet-Lite0 package).
* Metrics and grids: ``afconvert.metrics`` and ``afconvert.shift_grids``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import metrics as M
from .atomic import atomic_write
from .shift_grids import GridSpec, parse_grid_spec

__all__ = ["EvalError", "class_indices", "list_images", "EvalImages", "resolve_model", "evaluate_model",
           "format_table", "write_atomic", "run", "METRICS"]


class EvalError(ValueError):
    """A problem with the evaluation's inputs; the message names the fix."""


# ---------------------------------------------------------------- data

METRICS = ("accuracy", "integer", "half", "fractional", "consistency", "bilinear", "crop", "equivariance", "curve")
_ALIASES = {"certified": ("integer", "half", "fractional"), "default": ("accuracy", "integer", "half", "fractional",
            "consistency"), "all": METRICS}


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


def _image_ext() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def list_images(root: str | Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """(sorted class folder names, [(image path, folder)]) of an ImageFolder directory."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"--data {root}: no such directory; fix: point --data at an ImageFolder "
                        f"(DIR/<class>/<image>.jpg)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    exts = _image_ext()
    samples = [(p, f) for f in folders for p in sorted((root / f).rglob("*"))
               if p.is_file() and p.suffix.lower() in exts]
    if not samples:
        raise EvalError(f"--data {root} holds no images in class folders; fix: lay it out as DIR/<class>/<image> "
                        f"({', '.join(e for e in exts[:4])}, ...)")
    return folders, samples


def read_class_map(path: str | Path) -> dict[str, int]:
    """timm's class map convention: a text file, line i holds the folder name of class i."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--class-map {path}: no such file; fix: a text file with one folder name per line "
                        f"(line i = class index i)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"--class-map {path}: cannot read it as text ({type(exc).__name__}); fix: a text file with "
                        f"one folder name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    out: dict[str, int] = {}
    for i, line in enumerate(lines):
        name = line.strip()
        if not name:
            raise EvalError(f"--class-map {path}: line {i + 1} is empty; fix: one folder name per line, "
                            f"line i = class i")
        if name in out:
            raise EvalError(f"--class-map {path}: '{name}' appears on lines {out[name] + 1} and {i + 1}; fix: "
                            f"each folder once")
        out[name] = i
    if not out:
        raise EvalError(f"--class-map {path} is empty; fix: one folder name per line, line i = class i")
    return out


def class_indices(folders: Sequence[str], class_map: str | Path | None = None,
                  num_classes: int | None = None) -> tuple[dict[str, int], str]:
    """Map class folder names to the model's class indices; returns (mapping, how it was decided)."""
    if class_map is not None:
        cmap = read_class_map(class_map)
        missing = [f for f in folders if f not in cmap]
        if missing:
            raise EvalError(f"class folder '{missing[0]}' is not in --class-map {class_map}; fix: add it "
                            f"(line i = class i)")
        mapping, how = {f: cmap[f] for f in folders}, f"--class-map {class_map}"
    elif all(re.fullmatch(r"\d+", f) for f in folders):
        mapping, how = {f: int(f) for f in folders}, "folder name = class index"
    elif num_classes == 1000 and all(re.fullmatch(r"n\d{8}", f) for f in folders):
        from timm.data import ImageNetInfo
        synsets = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
        unknown = [f for f in folders if f not in synsets]
        if unknown:
            raise EvalError(f"class folder '{unknown[0]}' is not an ImageNet-1k synset; fix: pass --class-map FILE")
        mapping, how = {f: synsets[f] for f in folders}, "ImageNet-1k synset order"
    elif num_classes is not None and len(folders) == num_classes:
        mapping, how = {f: i for i, f in enumerate(sorted(folders))}, "sorted folder order (one folder per class)"
    else:
        raise EvalError(f"cannot tell which class each folder is ({len(folders)} folders, e.g. '{folders[0]}', for a "
                        f"{num_classes}-class model); fix: name folders by class index (e.g. 281/) or pass "
                        f"--class-map FILE (line i = the folder of class i)")
    if num_classes is not None:
        bad = [f for f, i in mapping.items() if not 0 <= i < num_classes]
        if bad:
            raise EvalError(f"class folder '{bad[0]}' maps to class {mapping[bad[0]]}, but the model has "
                            f"{num_classes} classes; fix: check the folder names or --class-map")
    return mapping, how


def _subset(n: int, limit: int | None) -> list[int]:
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

    def _open(self, path: Path):
        from PIL import Image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:
            raise EvalError(f"cannot read image {path} ({type(exc).__name__}); fix: remove or replace it") from None

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = self._open(path)
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


# ---------------------------------------------------------------- models

@dataclass
class Candidate:
    label: str
    model: nn.Module
    source: str


def _looks_like_path(arg: str) -> bool:
    return os.sep in arg or "/" in arg or Path(arg).suffix in (".pt", ".pth", ".bin", ".safetensors")


def resolve_model(arg: str, weights: str | None = None, pretrained: bool = True,
                  num_classes: int | None = None) -> Candidate:
    """An existing file: an afconvert checkpoint, loaded as saved. Otherwise a model name, built with its
    weights as the converter builds it (``afconvert.models.create_source_model``)."""
    if Path(arg).is_file():
        from .checkpoint import load
        model = load(arg)
        info = getattr(model, "afconvert_info", {}) or {}
        src = info.get("source") or {}
        source = (f"afconvert checkpoint: {src.get('library', 'timm')}:{src.get('name', '?')} converted with "
                  f"'{info.get('recipe', '?')}', weights {src.get('weights', '?')}")
        return Candidate(arg, model, source)
    if _looks_like_path(arg):
        raise EvalError(f"checkpoint not found: {arg}; fix: check the path (or give a model name such as "
                        f"convnext_tiny)")
    from .models import create_source_model
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    model, spec = create_source_model(arg, weights=weights, pretrained=pretrained, **kwargs)
    return Candidate(arg, model, f"{spec.library}:{spec.name}, weights {spec.weights}")


def data_config(model: nn.Module, input_size: int | None = None) -> dict:
    """timm's eval data config for ``model`` (its pretrained_cfg, or timm's defaults)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], int(input_size), int(input_size))
    return cfg


def _num_classes(model: nn.Module) -> int | None:
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name}: not a device; fix: cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available here; fix: --device cpu")
    return dev


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
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    chunk = forward_batch or (batch_size if device.type == "cpu" else 4 * batch_size)
    fwd = Forward(model, chunk, dtype)
    gen = {"int": torch.Generator().manual_seed(seed), "frac": torch.Generator().manual_seed(seed + 1)}
    s = _Sums()
    ts = grids.curve_shifts()
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=cand.label, unit="batch", file=sys.stderr, leave=False,
               disable=None if progress is None else not progress)
    for x, xe, y in bar:
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        logits = fwd(x)
        n_cls = logits.shape[-1]
        if int(y.max()) >= n_cls:
            raise EvalError(f"class index {int(y.max())} but {cand.label} has {n_cls} classes; fix: check the "
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
    wall = time.perf_counter() - t0
    if s.n == 0:
        raise EvalError("no images were evaluated; fix: check --data and --limit")

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
        "predictions": fwd.predictions, "wall_time_s": wall, "device": str(device),
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
    d = grids.to_dict()
    keys = {"integer": "integer", "half": "half", "fractional": "fractional", "bilinear": "bilinear",
            "consistency": "consistency", "crop": "crop", "curve": "curve", "equivariance": "equivariance"}
    return {v: d[v] for k, v in keys.items() if k in metrics}


# ---------------------------------------------------------------- output

def _cell(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_table(results: Sequence[dict]) -> str:
    """One row per model: accuracy, certified integer / half / fractional, consistency, non-finite, time."""
    head = ["model", "images", "top-1", "top-5", "cert-int", "cert-half", "cert-frac", "consist", "consist-frac",
            "nonfinite", "time"]
    rows = [[r["model"], str(r["images"]), _cell(r["accuracy"]), _cell(r["accuracy_top5"]),
             _cell(r["certified_integer"]), _cell(r["certified_half"]), _cell(r["certified_fractional"]),
             _cell(r["consistency"]), _cell(r["consistency_fractional"]), _cell(r["nonfinite"], "{:.0f}%"),
             f"{r['wall_time_s']:.0f} s" if r["wall_time_s"] >= 10 else f"{r['wall_time_s']:.1f} s"] for r in results]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    for r in results:
        extra = []
        if r.get("certified_bilinear") is not None:
            extra.append(f"certified bilinear {_cell(r['certified_bilinear'])}")
        if r.get("crop_shift"):
            c = r["crop_shift"]
            extra.append(f"crop-shift accuracy k=0..{c['k'][-1]}: " + " ".join(_cell(a, "{:.0f}") for a in c["accuracy"])
                         + f" (all windows: {_cell(c['certified'])})")
        if r.get("logit_change"):
            lc = r["logit_change"]
            extra.append("logit change at (1/2, 1/2): band-limited " + _mid(lc, "band_limited")
                         + ", bilinear " + _mid(lc, "bilinear"))
        if r.get("equivariance"):
            extra.append("equivariance diff: " + ", ".join(f"{k} {_cell(v, '{:.2e}')}" for k, v in r["equivariance"].items()))
        if extra:
            lines.append(f"{r['model']}: " + "; ".join(extra))
    if results:
        g = results[0]["grids"]
        lines.append("grids: " + ", ".join(f"{v['spec']} ({v['count']} shifts)" if "count" in v else v["spec"]
                                          for v in g.values()))
        lines.append("certified = correct on the image and on every shift of the band-limited image (Nyquist bins "
                     "zeroed); non-finite logits count as wrong")
    return "\n".join(lines)


def _mid(lc: dict, key: str) -> str:
    t = lc["t"]
    i = min(range(len(t)), key=lambda j: abs(t[j] - 0.5))
    return _cell(lc[key][i], "{:.2e}")


def _clean(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(results: Sequence[dict]) -> str:
    """The results as a JSON list (non-finite numbers as null)."""
    return json.dumps(_clean(list(results)), indent=2)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically: an interrupted run leaves no partial file."""
    atomic_write(path, data)


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert eval", description="Shift robustness of models on an ImageFolder "
                                "(accuracy, certified shift accuracy, consistency, ...).")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_CHECKPOINT",
                   help="timm name (convnext_tiny, efficientnet_lite0), torchvision:NAME, or an afconvert checkpoint")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder: DIR/<class>/<image>")
    p.add_argument("--metrics", default="default",
                   help=f"comma list of {', '.join(METRICS)}; aliases certified, default "
                        f"(accuracy,certified,consistency), all")
    p.add_argument("--grid", nargs="+", default=None, metavar="SPEC",
                   help="integer:LO..HI half:LO..HI fractional:N bilinear:N consistency:R crop:K curve:N "
                        "equivariance:DYxDX,..., or a preset: default (integer:0..3 half:0..3 fractional:4 bilinear:4 consistency:32 crop:8 curve:8), "
                        "paper (integer:0..31 half:0..31 fractional:12)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--forward-batch", type=int, default=None,
                   help="most images per model call when shifts are stacked (default: batch size on CPU, 4x on GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--limit", type=int, default=None, help="evaluate N images spread evenly over the data")
    p.add_argument("--class-map", metavar="FILE", help="text file, line i = the folder name of class i (timm's)")
    p.add_argument("--input-size", type=int, default=None, metavar="S", help="square input size (default: the model's)")
    p.add_argument("--weights", metavar="FILE", help="local weights for every model given by name")
    p.add_argument("--no-pretrained", action="store_true", help="random weights for models given by name")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of models given by name")
    p.add_argument("--seed", type=int, default=0, help="seed of the random consistency shifts (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON list (one object per model) instead of the table")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON to FILE (atomically)")
    p.add_argument("--plot", metavar="FILE.png", help="logit change vs sub-pixel shift and crop-shift accuracy curves")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_output(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise EvalError(f"{flag} {p} is a directory; fix: give a file path such as {p / 'eval.png'}")
    if not p.parent.is_dir():
        raise EvalError(f"{flag} {p}: directory {p.parent} does not exist; fix: create it first")


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_intermixed_args(list(argv))
    metrics = parse_metrics(args.metrics)
    grids = parse_grid_spec(args.grid)
    if args.batch_size < 1 or (args.forward_batch is not None and args.forward_batch < 1):
        raise EvalError("--batch-size and --forward-batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise EvalError("--limit must be >= 1")
    _check_output(args.out, "--out")
    _check_output(args.plot, "--plot")
    if args.plot:
        from .plots import require_matplotlib
        require_matplotlib()
        metrics |= {"curve", "crop"}
    device = _device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    folders, images = list_images(args.data)
    if args.class_map is not None:
        read_class_map(args.class_map)      # fail early, before loading models
    keep = _subset(len(images), args.limit)
    log = lambda msg: print(msg, file=sys.stderr)
    results = []
    for arg in args.models:
        cand = resolve_model(arg, args.weights, not args.no_pretrained, args.num_classes)
        mapping, how = class_indices(folders, args.class_map, _num_classes(cand.model))
        samples = [(images[i][0], mapping[images[i][1]]) for i in keep]
        log(f"{arg}: {cand.source}")
        log(f"  data: {len(samples)} images in {len(folders)} class folders of {args.data} (class: {how})")
        res = evaluate_model(cand, samples, metrics, grids, device, dtype, args.batch_size, args.forward_batch,
                             args.seed, args.input_size, progress=False if args.no_progress else None)
        res["class_mapping"] = how
        results.append(res)
        cand.model.cpu()
    text = to_json(results)
    if args.out:
        write_atomic(args.out, text + "\n")
    if args.plot:
        from .plots import plot_results
        plot_results(results, args.plot)
    if args.json:
        print(text)
    else:
        print(format_table(results))
        for path in (args.out, args.plot):
            if path:
                print(f"wrote {path}")
    broken = [r["model"] for r in results if r["predictions"] and r["nonfinite_predictions"] == r["predictions"]]
    if broken:
        log(f"afconvert eval: error: every prediction of {', '.join(broken)} has non-finite logits (the model is "
            f"numerically unstable); fix: re-convert it with the current afconvert (recipe afc) or fine-tune it")
        return 3
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """CLI entry of ``afconvert eval``: 0 on success, 2 with a one-line error, 3 when a model's predictions
    are all non-finite (its results are still printed and written), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("afconvert eval: interrupted; no output file was written or changed", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError, ImportError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"afconvert eval: error: {msg}", file=sys.stderr)
        return 2
