"""What the exact option for flattened heads (recipe option ``pool.head = "global"``) costs the function.

    python examples/flatten_heads.py [--models vgg11_bn alexnet] [--size 224]

VGG's and AlexNet's heads pool the last map to a fixed grid (7 x 7, 6 x 6), flatten it and read it with a
Linear that weighs each position differently: never shift-invariant. The option replaces the pool by the
global average broadcast to the grid (``BroadcastGlobalPool2d``): exactly invariant, and the Linear then acts
with its weight summed over the positions. For each model this prints, on skimage's photos (each whole, and
mirrored), how far the option moves the logits of the source model (relative to their spread over the photos)
and its top-1 agreement with the unchanged source; then the verdicts of ``afc`` with and without it.

Random weights only: torchvision's ImageNet weights need the network. On a trained head whose weights vary
little between neighbouring positions the change is smaller than on random weights, whose positions are
independent.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps

import afconvert
from afconvert.converter.certify import relative_change
from afconvert.layers.pool import BroadcastGlobalPool2d

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "clock")


def photos(size: int) -> torch.Tensor:
    """skimage's photos, whole and mirrored, resized to size x size, ImageNet-normalised: (2N, 3, size, size)."""
    import skimage.data
    views = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        im = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]).resize((size, size))
        views += [im, ImageOps.mirror(im)]
    x = torch.tensor(np.stack([np.asarray(v) for v in views]), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def with_global_head(model: torch.nn.Module) -> torch.nn.Module:
    """The source model with its adaptive pool replaced by the global average broadcast to the same grid."""
    out = copy.deepcopy(model)
    out.avgpool = BroadcastGlobalPool2d(model.avgpool.output_size)
    return out


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg11_bn", "alexnet"])
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    x = photos(args.size)
    print(f"{len(x)} views of skimage photos at {args.size} px, random weights (seed 0)")
    print("| model | logit change, source -> head option (of the spread) | top-1 agreement | afc | afc + head option |")
    print("|---|---|---|---|---|")
    for name in args.models:
        source = getattr(torchvision.models, name)(weights=None).eval()
        y, y_head = source(x), with_global_head(source)(x)
        change = relative_change(y_head, y, "spread")
        agree = float((y_head.argmax(1) == y.argmax(1)).float().mean())
        size = (args.size, args.size)
        plain = afconvert.convert(source, input_size=size).afconvert_report
        head = afconvert.convert(source, input_size=size, options={"pool": {"head": "global"}}).afconvert_report
        print(f"| {name} | {change:.2f} | {agree:.2f} | {plain.verdict.value} | "
              f"{'certified' if head.certified else head.verdict.value} |")


if __name__ == "__main__":
    main()
