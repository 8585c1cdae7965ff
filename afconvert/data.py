"""Images for every part of afconvert (calibration, evaluation, fine-tuning): one loader.

* ``list_images``: an ImageFolder ``DIR/<class folder>/<image>`` (torchvision's image extensions),
  or, with ``classes=False``, every image under a folder.
* ``class_indices``: class folder names -> the model's class indices (``--class-map`` file in timm's
  convention, integer folder names, ImageNet synsets, or sorted order when they are the classes).
* ``open_image``: one image as RGB, or ``None`` when it cannot be read (callers skip and count it).
* ``data_config`` / ``load_images``: timm's eval transform for a model, and a stack of images with it.
* ``training_samples`` / ``ImageDataset``: images (labelled by class folder, or not) for fine-tuning.

Wherever a folder of images is read, a folder holding an IDX pair (the MNIST family's format:
``<split>-images-idx3-ubyte[.gz]`` and ``<split>-labels-idx1-ubyte[.gz]``, ``read_idx``) is read too: its
images stay in memory (``ArrayImage``), labelled by class index, one split at a time (``train``, ``t10k``).
Images open as RGB, or as grayscale for a model with one input channel (``data_config``, ``image_mode``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

__all__ = ["DataError", "IMAGE_EXTENSIONS", "list_images", "find_images", "read_class_map", "class_indices",
           "open_image", "image_mode", "data_config", "set_data_config", "load_images", "ImageDataset",
           "training_samples", "read_idx", "write_idx", "idx_split", "ArrayImage"]


class DataError(ValueError):
    """A problem with the images or class names given; the message names the fix."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


# IDX (the MNIST family's format): b'\x00\x00', a type code, the number of dims, each dim as a big-endian uint32,
# then the values, big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}


def read_idx(path: str | Path):
    """The array (numpy) stored in an IDX file, gzipped or not (told by its first bytes, not its name)."""
    import gzip

    import numpy as np
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); fix: download or unpack it "
                        f"again") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (it starts {raw[:4].hex() or 'empty'}, not 0000 + a type "
                        f"code); fix: point --data at the MNIST-family *-idx?-ubyte[.gz] files")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header; fix: download or unpack it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    need = head + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "longer than its header says"
        raise DataError(f"{path}: IDX file {what} ({len(raw)} bytes, its header {shape} needs {need}); fix: "
                        f"download or unpack it again")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_files(root: Path) -> dict[str, dict[str, Path]]:
    """{split prefix: {"images": path, "labels": path}} of the IDX files in ``root``."""
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = re.fullmatch(r"(.*?)[-_.]?(images|labels)[-_.]idx([13])[-_.]ubyte(\.gz)?", p.name)
        if p.is_file() and m and (m.group(2) == "images") == (m.group(3) == "3"):
            found.setdefault(m.group(1), {})[m.group(2)] = p
    return found


class ArrayImage:
    """Image ``index`` of an in-memory stack (N, H, W) or (N, H, W, C) of uint8 pixels (an IDX file's): what
    ``open_image`` opens in place of a path."""

    __slots__ = ("array", "index")

    def __init__(self, array, index: int):
        self.array, self.index = array, int(index)

    def __repr__(self) -> str:
        return f"ArrayImage({self.index})"

    @property
    def name(self) -> str:
        """What messages call it, as they call a file by its name."""
        return f"image {self.index}"


def write_idx(path: str | Path, array) -> None:
    """Write a uint8 array (N, H, W) of images or (N,) of labels as an IDX file (the MNIST family's format;
    gzipped when ``path`` ends in .gz), atomically."""
    import gzip

    import numpy as np
    from afconvert.atomic import atomic_write
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()
    atomic_write(path, gzip.compress(raw, compresslevel=1) if str(path).endswith(".gz") else raw)


def idx_split(root: str | Path, split: str = "train", flag: str = "--data"):
    """(images (N, H, W[, C]) uint8, labels (N,) int64, split name) of the IDX pair of ``split`` in ``root``
    (``train``; ``test`` or ``t10k``), or None when ``root`` holds no IDX file."""
    import numpy as np
    root = Path(root)
    found = _idx_files(root)
    if not found:
        return None
    prefix = IDX_SPLITS.get(split)
    pair = found.get(prefix) if prefix else None
    if pair is None or len(pair) != 2:
        have = ", ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(found.items()))
        raise DataError(f"{flag} {root}: no IDX images + labels pair for split '{split}' (found: {have}); fix: "
                        f"--split {' or '.join(sorted(k for k, v in found.items() if len(v) == 2)) or 'train'}, "
                        f"or add the missing file")
    images, labels = read_idx(pair["images"]), read_idx(pair["labels"])
    if images.ndim not in (3, 4) or labels.ndim != 1:
        raise DataError(f"{pair['images'].name}: IDX images of shape {images.shape} and labels {labels.shape}; fix: "
                        f"images (N, H, W) and labels (N,)")
    if len(images) != len(labels):
        raise DataError(f"{flag} {root}: {len(images)} images in {pair['images'].name} but {len(labels)} labels in "
                        f"{pair['labels'].name}; fix: a matching pair of files (the same split)")
    if images.dtype != np.uint8:
        raise DataError(f"{pair['images'].name}: IDX images of type {images.dtype}; fix: images as uint8 pixels "
                        f"(0..255), as the MNIST family stores them")
    return images, labels.astype(np.int64), prefix


def _idx_samples(root: str | Path, split: str, flag: str):
    """[(ArrayImage, label)] and the class names ("0", "1", ...) of an IDX folder, or None for other folders."""
    got = idx_split(root, split, flag)
    if got is None:
        return None
    images, labels, _ = got
    classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return [(ArrayImage(images, i), int(c)) for i, c in enumerate(labels)], classes


def list_images(root: str | Path, flag: str = "--data", split: str = "test") -> tuple[list[str], list[tuple]]:
    """(sorted class folder names, [(image path, folder)]) of an ImageFolder directory; for an IDX folder, its
    ``split`` as (class names "0", "1", ..., [(ArrayImage, class name)])."""
    idx = _idx_samples(root, split, flag)
    if idx is not None:
        samples, classes = idx
        return classes, [(image, str(c)) for image, c in samples]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: no such directory; fix: point {flag} at an ImageFolder "
                        f"(DIR/<class>/<image>.jpg) or a folder of IDX files (*-images-idx3-ubyte[.gz] with "
                        f"*-labels-idx1-ubyte[.gz])")
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


def open_image(path, mode: str = "RGB"):
    """The image at ``path`` (or an ``ArrayImage``) as a PIL image in ``mode`` ("RGB", or "L" for grayscale),
    or None when it cannot be read (corrupt, not an image)."""
    from PIL import Image
    if isinstance(path, ArrayImage):
        return Image.fromarray(path.array[path.index]).convert(mode)
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except Exception:  # PIL raises many kinds for a bad file; the caller skips and counts it
        return None


def _in_chans(model) -> int | None:
    conv = next((m for m in model.modules() if hasattr(m, "in_channels") and hasattr(m, "kernel_size")), None)
    return None if conv is None else int(conv.in_channels)


def data_config(model, input_size: int | None = None) -> dict:
    """timm's eval data config for ``model`` (its pretrained_cfg, or timm's defaults), with the channels the
    model takes (its first convolution's): a one-channel model gets grayscale, normalised by the mean of the
    channels' mean and std."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    chans = _in_chans(model) or cfg["input_size"][0]
    if chans != cfg["input_size"][0]:
        cfg["input_size"] = (chans, *cfg["input_size"][1:])
        if chans == 1:
            cfg["mean"], cfg["std"] = (sum(cfg["mean"]) / len(cfg["mean"]),), (sum(cfg["std"]) / len(cfg["std"]),)
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], int(input_size), int(input_size))
    return cfg


def set_data_config(model, cfg: dict):
    """Make ``cfg`` (input size, mean, std, interpolation, crop) the model's timm ``pretrained_cfg``, which
    ``timm.data.resolve_data_config`` and ``afconvert.data.data_config`` read: how its inputs are prepared."""
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    merged = dict(getattr(model, "pretrained_cfg", None) or {})
    merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in keep})
    model.pretrained_cfg = merged
    return model


def image_mode(cfg: dict) -> str:
    """The PIL mode images open in for a data config: "L" for one channel, else "RGB"."""
    return "L" if cfg["input_size"][0] == 1 else "RGB"


def load_images(folder: str | Path, model, input_size: Sequence[int], limit: int = 64, flag: str = "--calibration",
                interpolation: str | None = None):
    """Up to ``limit`` readable images under ``folder`` (an IDX folder: its training split) with the model's timm
    eval transform at ``input_size`` (the whole image resized, with the model's interpolation unless
    ``interpolation`` says, and its mean/std): ((N, C, H, W) tensor, number of unreadable files skipped)."""
    import torch
    from timm.data import create_transform

    cfg = data_config(model)
    cfg.update(input_size=(cfg["input_size"][0], *input_size), crop_pct=1.0)
    if interpolation is not None:
        cfg["interpolation"] = interpolation
    transform = create_transform(**cfg)
    images, skipped = [], 0
    idx = _idx_samples(folder, "train", flag)
    for path in find_images(folder, flag) if idx is None else [image for image, _ in idx[0][:limit]]:
        if len(images) == limit:
            break
        img = open_image(path, image_mode(cfg))
        if img is None:
            skipped += 1
            continue
        images.append(transform(img))
    if not images:
        raise DataError(f"none of the images under {folder} can be read; fix: point {flag} at readable images")
    return torch.stack(images), skipped


class ImageDataset:
    """(transformed image, class index or -1) per path (or ``ArrayImage``), opened in ``mode``, or None for an
    unreadable file (``collate`` drops and counts it): a map-style dataset for ``torch.utils.data.DataLoader``."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, mode: str = "RGB"):
        self.samples, self.transform, self.mode = list(samples), transform, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = open_image(path, self.mode)
        return None if img is None else (self.transform(img), target)

    @staticmethod
    def collate(batch: list):
        """(images, targets, number of unreadable files) of the readable items of a batch."""
        import torch
        items = [b for b in batch if b is not None]
        if not items:
            return None, None, len(batch)
        return torch.stack([b[0] for b in items]), torch.tensor([b[1] for b in items]), len(batch) - len(items)


def training_samples(root: str | Path, flag: str = "--data", split: str = "train"
                     ) -> tuple[list[tuple[Path, int]], list[str]]:
    """Every image under ``root`` with its class folder's index (sorted folder names), or -1 for all when
    some images are not in class folders (an unlabeled folder); for an IDX folder, its ``split`` with its
    labels. Returns (samples, class folder names)."""
    idx = _idx_samples(root, split, flag)
    if idx is not None:
        return idx
    root = Path(root)
    files = find_images(root, flag)
    rel = [p.relative_to(root).parts for p in files]
    if all(len(parts) >= 2 for parts in rel):
        folders = sorted({parts[0] for parts in rel})
        index = {f: i for i, f in enumerate(folders)}
        return [(p, index[parts[0]]) for p, parts in zip(files, rel)], folders
    return [(p, -1) for p in files], []
