"""A real photo shifted by fractions of a pixel: how much do the logits of the original and of the
converted model move? (scikit-image's photo; random or --weights FILE weights.)

    python examples/shift_demo.py convnext_tiny [--weights FILE] [--size 128]
"""
import argparse

import torch
import torch.nn.functional as F

import afconvert
from afconvert.converter.certify import relative_logit_change


def photo(size: int) -> torch.Tensor:
    import skimage.data
    img = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return afconvert.zero_nyquist(x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="convnext_tiny")
    p.add_argument("--weights")
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    built = afconvert.build(args.model, weights=args.weights, pretrained=args.weights is not None,
                            input_size=(args.size, args.size))
    x = photo(args.size)
    shifts = [(0.25, 0), (0.5, 0.5), (1, 0), (1 / 3, 2 / 3), (2.5, -1.5)]
    for label, model in (("original", built.source), ("converted", built.converted)):
        change = relative_logit_change(model.eval(), x, shifts)
        print(f"{label:<10} " + "  ".join(f"{k}: {v:.1e}" for k, v in change.items()))


if __name__ == "__main__":
    main()
