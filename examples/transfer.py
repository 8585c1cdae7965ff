"""Real ImageNet weights carried to a user's own data: EfficientNet-Lite0 -> Fashion-MNIST (RGB, 96 x 96).

    python examples/transfer.py --out DIR [--quick] [--data /usr/share/datasets/fashion-mnist]
    python examples/transfer.py --probe r.pt [--quick]      # the probe of a checkpoint (afconvert recover's)

Four rows, the same labelled fine-tuning budget for each (timm's AdamW, cosine schedule, labels only):

  (a) the original, ImageNet weights: the reference, not alias-free;
  (b) converted (afc) from ImageNet weights, recovered on unlabelled training images (``afconvert.train.recover``:
      block-wise, the original as the only teacher), then fine-tuned;
  (c) converted from ImageNet weights, fine-tuned without recovery;
  (d) converted from random weights (the alias-free net from scratch), the same schedule.

Each row gets a linear probe of its starting point's pre-logit features (``afconvert.evaluation.probe``: 2,000
labelled training images to fit, 2,000 test images to score), its test top-1 after fine-tuning (all 10,000
test images), its certified accuracy under integer, half and fractional shifts (alias-free rows) and its wall
time. Images are whole, resized bilinearly to 96 x 96, normalised as the original (mean 0.5, std 0.5).
Writes DIR/recovered.pt (row b after recovery, before any label), DIR/finetuned.pt (row b at the end),
DIR/results.md, DIR/results.json, DIR/curves.png and each row's run under DIR/runs/. ``--quick``: fewer images
and steps (about 15 minutes on 2 CPU cores), the same rows.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import afconvert
from afconvert.atomic import atomic_savefig, atomic_write
from afconvert.data import idx_split, write_idx
from afconvert.evaluation.metrics import certified_correct, topk_correct
from afconvert.evaluation.probe import linear_probe
from afconvert.train.config import FinetuneConfig
from afconvert.train.finetune import finetune
from afconvert.train.recover import RecoverConfig, pre_logits, recover, split_held_out

SIZE = (96, 96)
CERTIFY_SHIFTS = {"integer": [(1, 0), (0, 1), (2, -3)], "half": [(0.5, 0), (0, 0.5), (0.5, 0.5)],
                  "fractional": [(1 / 3, 2 / 3), (0.25, -0.75), (2.2, 1.4)]}


@dataclass
class Budget:
    labelled: int           # labelled training images the rows fine-tune on
    unlabelled: int         # unlabelled training images recovery fits on (plus 256 held out)
    test: int               # test images scored after fine-tuning
    certify: int            # test images the certified accuracies run on
    steps: int              # fine-tuning steps of 32 images, each row
    recover_steps: int      # Adam steps per block in recovery
    distill_steps: int      # end-to-end steps in recovery
    probe: int = 2000       # images to fit the probe on, and to score it on


FULL = Budget(labelled=10000, unlabelled=1024, test=10000, certify=500, steps=300, recover_steps=60,
              distill_steps=150)
QUICK = Budget(labelled=2000, unlabelled=512, test=1000, certify=50, steps=40, recover_steps=12, distill_steps=20,
               probe=1000)


def tensors(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 3, 96, 96): gray to RGB, resized bilinearly, normalised as the original."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False, antialias=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def features(model, x: torch.Tensor) -> torch.Tensor:
    return pre_logits(model, x, 64)[0]


def with_classes(model, n: int):
    """``model`` with a new n-class classifier (timm's reset_classifier); a converted one records it, so its
    checkpoint rebuilds."""
    model.reset_classifier(n)
    info = getattr(model, "afconvert_info", None)
    if info is not None and info.source is not None:
        info.source = {**info.source, "kwargs": {**info.source.get("kwargs", {}), "num_classes": n}}
    return model


@torch.no_grad()
def scores(model, x: torch.Tensor, y: torch.Tensor, certify: int, exact: bool) -> dict:
    """Test top-1 on (x, y), and on the first ``certify`` images the certified accuracies (alias-free rows)."""
    model.eval()
    correct = torch.cat([topk_correct(model(b), t) for b, t in zip(x.split(100), y.split(100))])
    out = {"top1": float(correct.float().mean())}
    if exact:
        for kind, shifts in CERTIFY_SHIFTS.items():
            ok = certified_correct(model, x[:certify], y[:certify], shifts)
            out[f"certified_{kind}"] = float(ok.float().mean())
        out["top1_on_certified_images"] = float(correct[:certify].float().mean())
    return out


def finetune_row(name: str, model, data: Path, out: Path, budget: Budget) -> dict:
    cfg = FinetuneConfig(data=str(data), output=str(out / "runs" / name), steps=budget.steps, batch_size=32,
                         input_size=SIZE, scale=(0.6, 1.0), auto_augment="", lr=1e-3, weight_decay=0.05,
                         val_data=str(data), val_limit=min(budget.test, 2000), checkpoint_every=100, progress=False,
                         resume=(out / "runs" / name / "last.pt").exists())
    afconvert.data.set_data_config(model, {"input_size": (3, *SIZE), "interpolation": "bilinear", "crop_pct": 1.0,
                                           "mean": (0.5,) * 3, "std": (0.5,) * 3})
    summary = finetune(model, None, cfg, log=lambda msg: print(f"[{name}] {msg}", flush=True))
    return {"val": summary.get("val_top1")}


def labelled_folder(out: Path, train, test, budget: Budget, rng) -> tuple[Path, np.ndarray]:
    """DIR/data: an IDX folder of the labelled subset (train) and the test images; the subset's indices."""
    pick = rng.choice(len(train[0]), budget.labelled, replace=False)
    root = out / "data"
    write_idx(root / "train-images-idx3-ubyte.gz", train[0][pick])
    write_idx(root / "train-labels-idx1-ubyte.gz", train[1][pick])
    write_idx(root / "t10k-images-idx3-ubyte.gz", test[0][:budget.test])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test[1][:budget.test])
    return root, pick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="transfer")
    p.add_argument("--probe", metavar="CHECKPOINT", help="only the linear probe of this checkpoint and the original's")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    budget, out, rng = (QUICK if args.quick else FULL), Path(args.out), np.random.default_rng(0)
    torch.manual_seed(0)
    train, test = idx_split(args.data, "train")[:2], idx_split(args.data, "test")[:2]
    data, labelled = labelled_folder(out / "probe" if args.probe else out, train, test, budget, rng)
    rest = np.setdiff1d(np.arange(len(train[0])), labelled)
    unlabelled = tensors(train[0][rng.choice(rest, budget.unlabelled + 256, replace=False)])
    probe_train = (tensors(train[0][labelled[:budget.probe]]), torch.from_numpy(train[1][labelled[:budget.probe]]))
    probe_test = (tensors(test[0][:budget.probe]), torch.from_numpy(test[1][:budget.probe]).long())
    x_test, y_test = tensors(test[0][:budget.test]), torch.from_numpy(test[1][:budget.test]).long()

    def probe(model) -> float:
        return linear_probe(features(model, probe_train[0]), probe_train[1].long(), features(model, probe_test[0]),
                            probe_test[1])

    if args.probe:
        for label, model in (("original", afconvert.build("efficientnet_lite0", recipe="none").converted),
                             (args.probe, afconvert.load(args.probe))):
            print(f"linear probe of {label}: {100 * probe(model):.2f} % ({budget.probe} + {budget.probe} images)")
        return
    rows = {}
    fit, held = split_held_out(unlabelled, 256)
    for name in ("a", "b", "c", "d"):
        t0 = time.perf_counter()
        recipe = "none" if name == "a" else "afc"
        built = afconvert.build("efficientnet_lite0", pretrained=name != "d", recipe=recipe, input_size=SIZE,
                                calibration=fit[:256] if name == "b" else None)
        model, row = built.converted, {"recipe": recipe}
        if name == "b":
            cfg = RecoverConfig(steps=budget.recover_steps, distill_steps=budget.distill_steps)
            result = recover(model, built.source.eval(), fit, held, cfg, state=out / "recovered.pt.partial")
            row["recovery"] = {"before": result["before"], "after": result["after"], "seconds": result["seconds"]}
            model.afconvert_report = afconvert.audit(model, input_size=SIZE)
            afconvert.save(model, out / "recovered.pt")
        row["probe"] = probe(model)
        print(f"row {name}: probe {row['probe']:.4f}", flush=True)
        model = with_classes(model, 10)
        row.update(finetune_row(name, model, data, out, budget))
        if name != "a":
            row["certified"] = afconvert.audit(model, input_size=SIZE).certified
        row.update(scores(model, x_test, y_test, budget.certify, exact=name != "a"))
        if name == "b":
            afconvert.save(model, out / "finetuned.pt")
        row["seconds"] = time.perf_counter() - t0
        rows[name] = row
        print(f"row {name}: {json.dumps(row)}", flush=True)
        write_results(out, rows, budget)


LABELS = {"a": "(a) original, ImageNet weights (not alias-free)", "b": "(b) converted + recovered (unlabelled)",
          "c": "(c) converted, no recovery", "d": "(d) alias-free from random init"}


def write_results(out: Path, rows: dict, budget: Budget) -> None:
    atomic_write(out / "results.json", json.dumps({"budget": budget.__dict__, "rows": rows}, indent=2))
    lines = ["| row | probe top-1 at start | test top-1 after fine-tuning | certified integer / half / fractional | "
             "wall time |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        cert = " / ".join(f"{100 * r[f'certified_{k}']:.1f}" for k in CERTIFY_SHIFTS) + \
            f" % (top-1 {100 * r['top1_on_certified_images']:.1f} % there)" if "certified_integer" in r else "-"
        lines.append(f"| {LABELS[name]} | {100 * r['probe']:.1f} % | {100 * r['top1']:.2f} % | {cert} | "
                     f"{r['seconds'] / 60:.1f} min |")
    atomic_write(out / "results.md", "\n".join(lines) + "\n")
    plot(out, rows)


def plot(out: Path, rows: dict) -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows:
        path = out / "runs" / name / "val.csv"
        if path.exists():
            val = list(csv.DictReader(path.open()))
            ax.plot([int(v["step"]) for v in val], [float(v["top1"]) for v in val], marker="o", label=LABELS[name])
    ax.set_xlabel("fine-tuning step (32 labelled images)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7)
    atomic_savefig(out / "curves.png", fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
