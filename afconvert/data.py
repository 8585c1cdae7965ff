"""Images for every part of afconvert (calibration, evaluation, fine-tuning): one loader.

* ``list_images``: an ImageFolder ``DIR/<class folder>/<image>`` (torchvision's image extensions),
  or, with ``classes=False``, every image under a folder.
* ``class_indices``: class folder names -> the model's class indices (``--class-map`` file in timm's
  convention, integer folder names, ImageNet synsets, or sorted order when they are the classes).
* ``open_image``: one image as RGB, or ``None`` when it cannot be read (callers skip and count it).
* ``data_config`` / ``load_images``: timm's eval transform for a model, and a stack of images with it.
* ``training_samples`` / ``ImageDataset``: images (labelled by class folder, or not) for fine-tuning.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

__all__ = ["DataError", "IMAGE_EXTENSIONS", "list_images", "find_images", "read_class_map", "class_indices",
           "open_image", "data_config", "load_images", "ImageDataset", "training_samples"]


class DataError(ValueError):
    """A problem with the images or class names given; the message names the fix."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def list_images(root: str | Path, flag: str = "--data") -> tuple[list[str], list[tuple[Path, str]]]:
    """(sorted class folder names, [(image path, folder)]) of an ImageFolder directory."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: no such directory; fix: point {flag} at an ImageFolder "
                        f"(DIR/<class>/<image>.jpg)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [(p, f) for f in folders for p in sorted((root / f).rglob("*"))
               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"{flag} {root} holds no images in class folders; fix: lay it out as DIR/<class>/<image> "
                        f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return folders, samples


def find_images(root: str | Path, flag: str) -> list[Path]:
    """Every image under ``root`` (any depth, sorted)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
        if root.is_dir() else []
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; fix: point {flag} at a folder "
                        f"of images like the ones the model will see")
    return files


def read_class_map(path: str | Path) -> dict[str, int]:
    """timm's class map convention: a text file, line i holds the folder name of class i."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--class-map {path}: no such file; fix: a text file with one folder name per line "
                        f"(line i = class index i)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--class-map {path}: cannot read it as text ({type(exc).__name__}); fix: a text file with "
                        f"one folder name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    out: dict[str, int] = {}
    for i, line in enumerate(lines):
        name = line.strip()
        if not name:
            raise DataError(f"--class-map {path}: line {i + 1} is empty; fix: one folder name per line, "
                            f"line i = class i")
        if name in out:
            raise DataError(f"--class-map {path}: '{name}' appears on lines {out[name] + 1} and {i + 1}; fix: "
                            f"each folder once")
        out[name] = i
    if not out:
        raise DataError(f"--class-map {path} is empty; fix: one folder name per line, line i = class i")
    return out


def class_indices(folders: Sequence[str], class_map: str | Path | None = None,
                  num_classes: int | None = None) -> tuple[dict[str, int], str]:
    """Map class folder names to the model's class indices; returns (mapping, how it was decided)."""
    if class_map is not None:
        cmap = read_class_map(class_map)
        missing = [f for f in folders if f not in cmap]
        if missing:
            raise DataError(f"class folder '{missing[0]}' is not in --class-map {class_map}; fix: add it "
                            f"(line i = class i)")
        mapping, how = {f: cmap[f] for f in folders}, f"--class-map {class_map}"
    elif all(re.fullmatch(r"\d+", f) for f in folders):
        mapping, how = {f: int(f) for f in folders}, "folder name = class index"
    elif num_classes == 1000 and all(re.fullmatch(r"n\d{8}", f) for f in folders):
        from timm.data import ImageNetInfo
        synsets = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
        unknown = [f for f in folders if f not in synsets]
        if unknown:
            raise DataError(f"class folder '{unknown[0]}' is not an ImageNet-1k synset; fix: pass --class-map FILE")
        mapping, how = {f: synsets[f] for f in folders}, "ImageNet-1k synset order"
    elif num_classes is not None and len(folders) == num_classes:
        mapping, how = {f: i for i, f in enumerate(sorted(folders))}, "sorted folder order (one folder per class)"
    else:
        raise DataError(f"cannot tell which class each folder is ({len(folders)} folders, e.g. '{folders[0]}', for a "
                        f"{num_classes}-class model); fix: name folders by class index (e.g. 281/) or pass "
                        f"--class-map FILE (line i = the folder of class i)")
    if num_classes is not None:
        bad = [f for f, i in mapping.items() if not 0 <= i < num_classes]
        if bad:
            raise DataError(f"class folder '{bad[0]}' maps to class {mapping[bad[0]]}, but the model has "
                            f"{num_classes} classes; fix: check the folder names or --class-map")
    return mapping, how


def open_image(path: str | Path):
    """The image at ``path`` as an RGB PIL image, or None when it cannot be read (corrupt, not an image)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:  # PIL raises many kinds for a bad file; the caller skips and counts it
        return None


def data_config(model, input_size: int | None = None) -> dict:
    """timm's eval data config for ``model`` (its pretrained_cfg, or timm's defaults)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], int(input_size), int(input_size))
    return cfg




def load_images(folder: str | Path, model, input_size: Sequence[int], limit: int = 64, flag: str = "--calibration"):
    """Up to ``limit`` readable images under ``folder`` with the model's timm eval transform at ``input_size``
    (resize, centre crop, its mean/std): ((N, C, H, W) tensor, number of unreadable files skipped)."""
    import torch
    from timm.data import create_transform

    cfg = data_config(model)
    cfg.update(input_size=(cfg["input_size"][0], *input_size), crop_pct=1.0)
    transform = create_transform(**cfg)
    images, skipped = [], 0
    for path in find_images(folder, flag):
        if len(images) == limit:
            break
        img = open_image(path)
        if img is None:
            skipped += 1
            continue
        images.append(transform(img))
    if not images:
        raise DataError(f"none of the images under {folder} can be read; fix: point {flag} at readable images")
    return torch.stack(images), skipped


class ImageDataset:
    """(transformed image, class index or -1) per path, or None for an unreadable file (``collate``
    drops and counts it): a map-style dataset for ``torch.utils.data.DataLoader``."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = open_image(path)
        return None if img is None else (self.transform(img), target)

    @staticmethod
    def collate(batch: list):
        """(images, targets, number of unreadable files) of the readable items of a batch."""
        import torch
        items = [b for b in batch if b is not None]
        if not items:
            return None, None, len(batch)
        return torch.stack([b[0] for b in items]), torch.tensor([b[1] for b in items]), len(batch) - len(items)


def training_samples(root: str | Path, flag: str = "--data") -> tuple[list[tuple[Path, int]], list[str]]:
    """Every image under ``root`` with its class folder's index (sorted folder names), or -1 for all when
    some images are not in class folders (an unlabeled folder). Returns (samples, class folder names)."""
    root = Path(root)
    files = find_images(root, flag)
    rel = [p.relative_to(root).parts for p in files]
    if all(len(parts) >= 2 for parts in rel):
        folders = sorted({parts[0] for parts in rel})
        index = {f: i for i, f in enumerate(folders)}
        return [(p, index[parts[0]]) for p, parts in zip(files, rel)], folders
    return [(p, -1) for p in files], []
