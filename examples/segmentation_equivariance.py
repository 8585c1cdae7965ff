"""An exactly shift-equivariant segmentation net: a pretrained backbone (EfficientNet-Lite0, ImageNet weights,
``features_only``) with a light FPN decoder (1x1 laterals, bilinear up-sampling to the skip's size, a 3x3
conv), converted with ``afc``: its mask moves with the image by half a pixel and a third of a pixel, exactly.

    python examples/segmentation_equivariance.py --out DIR [--steps 150]

The task is small and real: foreground / background by Otsu's threshold on skimage photos (the label is
computed, so no download). The original is trained first (``--steps`` Adam steps on random crops); the
converted copy keeps its weights and is fine-tuned the same number of steps (conversion changes the
function). On held-out photos at a non-square size, for shifts of (1/2, 1/2) and (1/3, 2/3) pixel: the
relative change of the logits against their own band-limited shift, the share of mask pixels that change,
and the IoU with the Otsu mask. Writes DIR/segmentation.png (the two masks and their difference, original
vs converted), DIR/results.json and DIR/converted.txt (the per-output certificate). About 5 minutes on 2
CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import skimage.data
import skimage.filters
import torch
import torch.nn as nn
import torch.nn.functional as F

import afconvert
from afconvert.atomic import atomic_savefig, atomic_write
from afconvert.converter.certify import relative_change
from afconvert.layers.spectral import fractional_shift, zero_nyquist

TRAIN = ["astronaut", "chelsea", "rocket", "camera", "coins", "moon", "page", "clock", "hubble_deep_field", "colorwheel"]
HELDOUT = ["coffee", "text", "immunohistochemistry", "retina"]
SHIFTS = {"half": (0.5, 0.5), "third": (1 / 3, 2 / 3)}
SIZE = (96, 128)               # evaluation size, H x W (not square)


class FPNSegmenter(nn.Module):
    """Backbone feature maps (strides 4, 8, 16) -> 1x1 laterals, each coarser map bilinearly up-sampled to
    the next one's size and added -> 3x3 conv -> per-pixel logits, up-sampled to the input size."""

    def __init__(self, backbone: nn.Module, channels, classes: int = 2, width: int = 32):
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        feats = self.backbone(x)
        y = self.lateral[2](feats[2])
        y = F.interpolate(y, size=feats[1].shape[-2:], mode="bilinear", align_corners=False) + self.lateral[1](feats[1])
        y = F.interpolate(y, size=feats[0].shape[-2:], mode="bilinear", align_corners=False) + self.lateral[0](feats[0])
        y = self.head(self.smooth(y))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def photo(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (3, H, W) in [0, 1], Otsu foreground mask (H, W) as 0/1) of a skimage photo."""
    a = getattr(skimage.data, name)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    gray = a.astype(np.float64).mean(-1)
    mask = gray > skimage.filters.threshold_otsu(gray)
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255, torch.from_numpy(mask).long()


def resized(img: torch.Tensor, mask: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    x = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    m = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return x, m


def crops(photos, n: int, size: int, g: torch.Generator):
    """n random crops (with flips) of photos resized to 160 px on the short side."""
    xs, ms = [], []
    for _ in range(n):
        img, mask = photos[int(torch.randint(len(photos), (1,), generator=g))]
        h, w = img.shape[-2:]
        s = 160 / min(h, w)
        img, mask = resized(img, mask, (round(h * s), round(w * s)))
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        x, m = img[:, top:top + size, left:left + size], mask[top:top + size, left:left + size]
        if torch.rand((), generator=g) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        xs.append(x)
        ms.append(m)
    return torch.stack(xs), torch.stack(ms)


def train(model: nn.Module, photos, steps: int, normalize, seed: int = 0, log=print) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        x, m = crops(photos, 8, 96, g)
        loss = F.cross_entropy(model(normalize(x)), m)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the two classes of |pred = c and target = c| / |pred = c or target = c|."""
    return float(np.mean([((pred == c) & (target == c)).sum().item() / max(((pred == c) | (target == c)).sum().item(), 1)
                          for c in (0, 1)]))


@torch.no_grad()
def measure(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    """IoU with the Otsu mask; per shift: the logits' change against their own shift (relative to max |logits|)
    and the share of pixels whose class changes (mask of the shifted image vs the shifted mask)."""
    y = model(x)
    out = {"iou": iou(y.argmax(1), target)}
    for name, d in SHIFTS.items():
        moved, expected = model(fractional_shift(x, *d)), fractional_shift(y, *d)
        out[f"{name}_logit_change"] = relative_change(moved, expected)
        out[f"{name}_mask_pixels_changed"] = float((moved.argmax(1) != expected.argmax(1)).float().mean())
    return out


@torch.no_grad()
def picture(models: dict, x: torch.Tensor, image: torch.Tensor, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = SHIFTS["half"]
    fig, axes = plt.subplots(len(models), 5, figsize=(16, 3.1 * len(models)))
    for row, (label, model) in zip(axes, models.items()):
        y = model(x)
        moved, expected = model(fractional_shift(x, *d)), fractional_shift(y, *d)
        change = (moved - expected).abs().amax(1)[0] / y.abs().max()
        a, b = moved.argmax(1)[0], expected.argmax(1)[0]
        panels = [(image.permute(1, 2, 0).clamp(0, 1).numpy(), None, "held-out photo x"),
                  (a.numpy(), "gray", "mask of shift(x, 1/2 px)"), (b.numpy(), "gray", "shift(mask of x, 1/2 px)"),
                  ((a != b).numpy(), "Reds", f"pixels that differ: {int((a != b).sum())}")]
        for ax, (img, cmap, title) in zip(row, panels):
            ax.imshow(img, cmap=cmap, vmin=0 if cmap == "Reds" else None, vmax=1 if cmap == "Reds" else None)
            ax.set_title(title, fontsize=10)
        im = row[4].imshow(change.numpy(), cmap="magma", vmin=0)
        row[4].set_title(f"|logit difference| / max|logit| (max {float(change.max()):.1e})", fontsize=10)
        fig.colorbar(im, ax=row[4], fraction=0.035)
        row[0].set_ylabel(label, fontsize=12)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=150, help="training steps of each model (batches of 8 crops)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from afconvert.sources import efficientnet_lite0 as lite0
    mean, std = torch.tensor(lite0.MEAN).view(1, 3, 1, 1), torch.tensor(lite0.STD).view(1, 3, 1, 1)

    def normalize(x):
        return (x - mean) / std

    backbone = lite0.load_timm_model(features_only=True, out_indices=(1, 2, 3))
    original = FPNSegmenter(backbone, backbone.feature_info.channels())
    photos = [photo(n) for n in TRAIN]
    t0 = time.perf_counter()
    print(f"training the original ({args.steps} steps)")
    train(original, photos, args.steps, normalize)
    converted = afconvert.convert(original, input_size=SIZE)
    report = converted.afconvert_report
    atomic_write(args.out / "converted.txt", report.summary() + "\n")
    print(report.summary())
    print(f"fine-tuning the converted copy ({args.steps} steps)")
    train(converted, photos, args.steps, normalize, seed=1)
    minutes = (time.perf_counter() - t0) / 60

    results = {"size": list(SIZE), "shifts": {k: list(v) for k, v in SHIFTS.items()}, "train_minutes": minutes,
               "verdict": afconvert.audit(converted, input_size=SIZE, check=False).verdict_text, "photos": {}}
    models = {"original": original, "converted (afc)": converted}
    for name in HELDOUT:
        img, mask = resized(*photo(name), SIZE)
        x = zero_nyquist(normalize(img[None]))          # band-limited: its shifts are defined exactly
        results["photos"][name] = {label: measure(m, x, mask[None]) for label, m in models.items()}
    for label in models:
        rows = [r[label] for r in results["photos"].values()]
        results[label] = {k: float(np.mean([r[k] for r in rows])) if "logit" not in k else max(r[k] for r in rows)
                          for k in rows[0]}
    atomic_write(args.out / "results.json", json.dumps(results, indent=2))
    img, _ = resized(*photo(HELDOUT[0]), SIZE)
    picture(models, zero_nyquist(normalize(img[None])), img, args.out / "segmentation.png")
    print(f"\n{'model':<18} {'IoU':>6} {'half: logit change':>19} {'pixels changed':>15} "
          f"{'third: logit change':>20} {'pixels changed':>15}")
    for label in models:
        r = results[label]
        print(f"{label:<18} {r['iou']:6.3f} {r['half_logit_change']:19.2e} {100 * r['half_mask_pixels_changed']:14.2f}%"
              f" {r['third_logit_change']:20.2e} {100 * r['third_mask_pixels_changed']:14.2f}%")
    print(f"(mean IoU over {len(HELDOUT)} held-out photos; the worst logit change; {minutes:.1f} min of training)")
    print(f"wrote {args.out / 'segmentation.png'}, {args.out / 'results.json'}, {args.out / 'converted.txt'}")


if __name__ == "__main__":
    main()
