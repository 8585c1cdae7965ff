"""Accuracy that comes back, end to end on Fashion-MNIST, with afconvert's own commands.

    python examples/fashion_mnist.py --out DIR [--quick] [--data /usr/share/datasets/fashion-mnist]

Data: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``: 60,000 training
and 10,000 test images, 28 x 28 gray, read in place from its IDX files). Model: timm ``resnet18``,
``--in-chans 1 --num-classes 10`` at 28 x 28 (``SIZE``). Stages (each an ``afconvert`` command, printed as it runs):

1. ``train --recipe none``: the baseline, saved as ``DIR/baseline.pt``;
2. ``finetune --recipe afc-fullband|aps|blurpool|circular``: the baseline converted by each recipe and fine-tuned
   from it. The alias-free one (``afc-fullband``: ``afc`` whose first layer down-samples after its activation, so
   the network sees the image's full band) with the recipe that recovers the accuracy: activations fitted per
   channel on real images (``--calibration``), a blend from the source network annealed to the alias-free one
   over the first 15 % of the steps, distillation from the baseline (KL at T = 2 plus cross-entropy), learning
   rate 3e-3; ``DIR/afc_finetuned.pt``. ``aps`` at 32 x 32 (``PEER_SIZE``: exact for integer shifts only where the
   stride divides every map, and 28 px reaches 7 x 7);
3. ``train --recipe afc-fullband``: the same alias-free network from scratch on the labels, and ``finetune
   --no-pretrained --teacher``: from scratch distilled from the same teacher with the same schedule (what the
   converted weights buy apart from the teacher);
4. ``eval``: top-1 on the whole test set, then certified integer / half / fractional accuracy, consistency
   and crop-shift accuracy on the grids below.

The runs validate on the test set after each epoch (``--val-data``). Writes ``DIR/results.md``,
``DIR/results.json`` (one row per model), ``DIR/curves.png`` (test top-1 against epochs) and each run's
folder under ``DIR/runs/``. Killed, it resumes where it stopped: run the same command again. ``--quick``
(about 15 minutes on 2 CPU cores) takes the same path with fewer steps and test images (top-1 on 2,000), and
leaves out the two runs from scratch (stage 3), whose schedule would double it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from afconvert.atomic import atomic_savefig, atomic_write

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MODEL = "resnet18"
SIZE = "28"                                         # input size: the images' own
# aps samples the polyphase component of largest norm, exact for integer shifts only where the stride divides every
# map it samples: at 28 px ResNet-18 reaches 7 x 7, so its peer run trains and is evaluated at 32 px (16, 8, .. 1)
PEER_SIZE = {"aps": "32"}
AFC = "afc-fullband"                                # the alias-free recipe
COMMON = ["--num-classes", "10", "--in-chans", "1", "--batch-size", "128", "--aa", "", "--scale", "0.9", "1.0",
          "--no-progress"]
KD = ["--kd-temperature", "2", "--task-loss-weight", "1", "--clip-grad", "2", "--train-bn"]
GRIDS = ["integer:0..1", "half:0..0", "fractional:3", "consistency:4", "crop:1"]

# length of each run: epochs (full; a checkpoint per epoch of 468 steps) or optimizer steps (quick), test images for
# the curves and the certified metrics
FULL = {"baseline": ["--epochs", "12", "--checkpoint-every", "468"],
        "afc": ["--epochs", "7", "--checkpoint-every", "468"], "peer": ["--steps", "235"],
        "scratch": True, "val_limit": 2000, "eval_limit": 500, "ablation": ["--steps", "235"]}
QUICK = {"baseline": ["--steps", "400"], "afc": ["--steps", "800"], "peer": ["--steps", "20"], "scratch": False,
         "val_limit": 300, "eval_limit": 200, "top1_limit": 2000, "ablation": ["--steps", "20"]}

# --ablation: the afc fine-tuning recipe (AFC_RECIPE) with one ingredient changed at a time
AFC_RECIPE = ["--lr", "1e-3", *KD]
ABLATION = {
    "recipe (KL T=2 + CE 1, lr 1e-3, BN trained)": [],
    "+ per-channel activation fit on 64 images (--calibration)": ["--calibration", "{data}"],
    "+ block-wise reconstruction (--reconstruct, 30 steps x 2 batches per block)": [
        "--reconstruct", "--reconstruct-steps", "30", "--reconstruct-batches", "2"],
    "+ blend, all layers, over half the steps (--blend 0.5)": ["--blend", "0.5"],
    "+ blend, front to back (--blend 0.5 --blend-order progressive)": ["--blend", "0.5", "--blend-order",
                                                                       "progressive"],
    "KL only (--task-loss-weight 0)": ["--task-loss-weight", "0"],
    "T = 1 (--kd-temperature 1)": ["--kd-temperature", "1"],
    "T = 4 (--kd-temperature 4)": ["--kd-temperature", "4"],
    "lr 3e-3": ["--lr", "3e-3"],
    "lr 3e-4": ["--lr", "3e-4"],
    "BatchNorm statistics frozen (no --train-bn)": ["--no-train-bn"],
}


def size_flags(px: str = SIZE) -> list[str]:
    return ["--input-size", px, px]


def afconvert(*argv: str) -> None:
    """Run one ``afconvert`` command in this process, printing it first; stop on failure."""
    from afconvert.cli import main
    print("$ afconvert " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(list(argv))
    if code:
        sys.exit(f"fashion_mnist: 'afconvert {argv[0]}' failed with exit code {code}")


def run(out: Path, name: str, argv: list[str], minutes: dict) -> Path:
    """``afconvert train|finetune ... --output out/runs/name``, resumed if a killed run is there; its final.pt."""
    folder = out / "runs" / name
    final = folder / "final.pt"
    if not final.is_file():
        t0 = time.perf_counter()
        afconvert(*argv, "--output", str(folder), *(["--resume"] if (folder / "last.pt").is_file() else []))
        minutes[name] = round((time.perf_counter() - t0) / 60, 2)
        atomic_write(folder / "minutes.txt", f"{minutes[name]}\n")
    elif (folder / "minutes.txt").is_file():
        minutes[name] = float((folder / "minutes.txt").read_text())
    return final


def run_name(out: Path, path: Path) -> str | None:
    """The run a model file came from (``out/runs/NAME/final.pt``), or None (not trained here)."""
    return path.parent.name if path.parent.parent == out / "runs" else None


def curves(out: Path, names: dict[str, str], baseline_top1: float | None) -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in names.items():
        path = out / "runs" / name / "val.csv"
        if path.is_file():
            rows = list(csv.DictReader(open(path)))
            ax.plot([float(r["epoch"]) for r in rows], [float(r["top1"]) for r in rows], marker="o", label=label)
    if baseline_top1 is not None:
        ax.axhline(baseline_top1, color="k", ls="--", lw=1, label="baseline (not alias-free)")
        ax.axhline(baseline_top1 - 1, color="gray", ls=":", lw=1, label="baseline - 1 point")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)",
           title=f"Fashion-MNIST: alias-free ResNet-18 ({AFC}), {SIZE} x {SIZE}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_savefig(out / "curves.png", fig, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default=FASHION_MNIST, help=f"IDX folder (default {FASHION_MNIST})")
    p.add_argument("--quick", action="store_true", help="subsets and fewer steps (same path), about 15 minutes")
    p.add_argument("--ablation", action="store_true", help="instead: the afc fine-tuning recipe with one "
                   "ingredient changed at a time, each from DIR/baseline.pt (trained first if missing)")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"fashion_mnist: no {args.data}; fix: apt-get install dataset-fashion-mnist, or --data DIR")
    plan = QUICK if args.quick else FULL
    out, data = args.out, ["--data", args.data, "--val-data", args.data, "--val-limit", str(plan["val_limit"])]
    out.mkdir(parents=True, exist_ok=True)
    minutes: dict[str, float] = {}

    base = run(out, "baseline", ["train", MODEL, "--recipe", "none", "--lr", "2e-3", "--weight-decay", "0.05",
                                 *plan["baseline"], *data, *COMMON, *size_flags()], minutes)
    atomic_write(out / "baseline.pt", base.read_bytes())
    if args.ablation:
        return ablation(out, data, plan, minutes)
    teacher = ["--teacher", MODEL, "--teacher-weights", str(out / "baseline.pt")]
    models = {"baseline": base}
    converted = out / "afc_converted.pt"
    if not converted.is_file():
        afconvert(MODEL, "--weights", str(out / "baseline.pt"), "--num-classes", "10", "--in-chans", "1",
                  *size_flags(), "--recipe", AFC, "--out", str(converted))
    models[f"{AFC} converted, no training"] = converted
    models[f"{AFC} converted + fine-tuned"] = run(out, "afc_finetuned", [
        "finetune", MODEL, "--weights", str(out / "baseline.pt"), "--recipe", AFC, "--calibration", args.data,
        "--blend", "0.15", "--lr", "3e-3", *KD, *plan["afc"], *data, *COMMON, *size_flags()], minutes)
    atomic_write(out / "afc_finetuned.pt", models[f"{AFC} converted + fine-tuned"].read_bytes())
    for recipe in ("aps", "blurpool", "circular"):
        models[f"{recipe} converted + fine-tuned"] = run(out, f"{recipe}_finetuned", [
            "finetune", MODEL, "--weights", str(out / "baseline.pt"), "--recipe", recipe, "--lr", "5e-4", *KD,
            *plan["peer"], *data, *COMMON, *size_flags(PEER_SIZE.get(recipe, SIZE))], minutes)
    if plan["scratch"]:         # what the converted weights buy: the same schedule from random weights
        models[f"{AFC} from scratch, labels"] = run(out, "afc_scratch", [
            "train", MODEL, "--recipe", AFC, "--lr", "2e-3", "--clip-grad", "2", *plan["afc"], *data, *COMMON,
            *size_flags()], minutes)
        models[f"{AFC} from scratch, same teacher"] = run(out, "afc_scratch_teacher", [
            "finetune", MODEL, "--no-pretrained", "--recipe", AFC, *teacher, "--lr", "3e-3", *KD, *plan["afc"],
            *data, *COMMON, *size_flags()], minutes)

    paths = [str(m) for m in models.values()]
    limit = ["--limit", str(plan["top1_limit"])] if args.quick else []
    t0 = time.perf_counter()
    if not (out / "eval_top1.json").is_file():         # each evaluation once: a killed run resumes after it
        afconvert("eval", *paths, "--data", args.data, "--metrics", "accuracy", "--batch-size", "256",
                  "--no-progress", "--out", str(out / "eval_top1.json"), *limit)
    if not (out / "eval_shifts.json").is_file():
        afconvert("eval", *paths, "--data", args.data, "--metrics", "accuracy,certified,consistency,crop", "--grid",
                  *GRIDS, "--batch-size", "64", "--limit", str(plan["eval_limit"]), "--no-progress",
                  "--out", str(out / "eval_shifts.json"))
    minutes["evaluation"] = round((time.perf_counter() - t0) / 60, 2)
    write_results(out, models, minutes, plan, args)


def ablation(out: Path, data: list[str], plan: dict, minutes: dict) -> None:
    """Each ABLATION variant fine-tuned from the baseline for the same steps; DIR/ablation.md and .json."""
    import csv
    rows = []
    for i, (label, change) in enumerate(ABLATION.items()):
        change = [a.format(data=data[1]) for a in change]
        argv = ["finetune", MODEL, "--weights", str(out / "baseline.pt"), "--recipe", "afc", *AFC_RECIPE, *change,
                *plan["ablation"], *data, *COMMON, *size_flags()]
        run(out, f"ablation/{i:02d}", argv, minutes)
        val = list(csv.DictReader(open(out / "runs" / "ablation" / f"{i:02d}" / "val.csv")))
        rows.append({"variant": label, "change": " ".join(change) or "(none)", "top1": float(val[-1]["top1"]),
                     "start_top1": float(val[0]["top1"]), "minutes": minutes[f"ablation/{i:02d}"]})
    atomic_write(out / "ablation.json", json.dumps(rows, indent=2))
    lines = [f"# afc fine-tuning ablation ({' '.join(plan['ablation'])} from the baseline, test top-1 on "
             f"{plan['val_limit']} images)", "", "| variant | top-1 at start | top-1 after | minutes |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['start_top1']:.1f} | {r['top1']:.1f} | {r['minutes']:.1f} |" for r in rows]
    atomic_write(out / "ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_results(out: Path, models: dict, minutes: dict, plan: dict, args) -> None:
    total = round(sum(minutes.values()), 1)           # every stage, those of earlier (killed) invocations too
    top1 = json.loads((out / "eval_top1.json").read_text())           # one object per model, in order
    shifts = json.loads((out / "eval_shifts.json").read_text())
    rows = []
    for (label, path), a, s in zip(models.items(), top1, shifts):
        rows.append({"model": label, "file": str(path), "train_minutes": minutes.get(run_name(out, path)),
                     "top1": a["accuracy"], "top1_subset": s["accuracy"], "certified_integer": s["certified_integer"],
                     "certified_half": s["certified_half"], "certified_fractional": s["certified_fractional"],
                     "consistency": s["consistency"], "crop_shift": (s["crop_shift"] or {}).get("certified")})
    atomic_write(out / "results.json", json.dumps({"rows": rows, "grids": GRIDS, "quick": args.quick,
                                                   "minutes": minutes, "total_minutes": total},
                                                  indent=2))
    fmt = lambda v: "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)   # noqa: E731
    n_top1 = "10,000" if not args.quick else f"{plan['top1_limit']:,}"
    lines = [f"# Fashion-MNIST: {'quick run' if args.quick else 'full run'} ({total} min of training and evaluation)", "",
             f"top-1 on {n_top1} test images; certified / consistency / crop-shift on {plan['eval_limit']} "
             f"(grids: {' '.join(GRIDS)}).", "",
             "| model | train min | top-1 | top-1 (subset) | cert. integer | cert. half | cert. fractional | "
             "consistency | crop-shift |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in ("model", "train_minutes", "top1", "top1_subset",
                                                          "certified_integer", "certified_half",
                                                          "certified_fractional", "consistency", "crop_shift"))
                     + " |")
    atomic_write(out / "results.md", "\n".join(lines) + "\n")
    base = rows[0]["top1"]
    curves(out, {"afc_finetuned": f"{AFC} converted + fine-tuned", "afc_scratch": f"{AFC} from scratch (labels)",
                 "afc_scratch_teacher": f"{AFC} from scratch (same teacher)"}, base)
    print("\n".join(lines))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
