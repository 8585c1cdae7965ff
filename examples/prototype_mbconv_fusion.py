"""Prototype, measured: the MBConv expansion fusion for EfficientNet-class networks.

In an inverted residual block the expansion (1 x 1 conv + BatchNorm, C -> E = 6C channels) feeds an activation,
whose alias-free form needs the band-limited square B(x) = R_N((R_M x)^2): x taken to the 3/2 grid M. R_M is
linear and acts on each channel alone, so it commutes with the per-pixel affine map x = a * (W z) + b:

    R_M x = a * (W R_M z) + b

which resamples the C input channels instead of the E expanded ones, and runs the 1 x 1 conv on the M grid
(2.25x the pixels) besides the N grid (still needed for the linear term and the scale). This script times, for
each expansion of timm's efficientnet_b0 at the given input size, B from the expanded map (what the converted
model does) against the fused form, in one process, and checks that both agree. Nothing here is in the library.

    python examples/prototype_mbconv_fusion.py [--batch 8] [--size 224] [--threads 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import math
import time

import timm
import torch
import torch.nn.functional as F

from afconvert.layers.quadratic import band_limited_square
from afconvert.layers.spectral import ideal_resample


def expansions(size: int) -> list[tuple[str, torch.nn.Conv2d, torch.nn.BatchNorm2d, tuple[int, ...]]]:
    """(block name, expansion conv, its BatchNorm, input shape without the batch) of every inverted residual."""
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    found, shapes = [], {}
    for name, m in model.named_modules():
        if hasattr(m, "conv_pw") and hasattr(m, "conv_pwl"):
            found.append((name, m.conv_pw, m.bn1))
            m.conv_pw.register_forward_pre_hook(lambda mod, args, n=name: shapes.update({n: tuple(args[0].shape[1:])}))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return [(n, conv, bn, shapes[n]) for n, conv, bn in found]


def affine(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    a = bn.weight / (bn.running_var + bn.eps).sqrt()
    return a, bn.bias - bn.running_mean * a


def square_expanded(z, weight, a, b):
    """What the converted model computes: B of the expanded map."""
    x = torch.addcmul(b[:, None, None], a[:, None, None], F.conv2d(z, weight))
    return band_limited_square(x)


def square_fused(z, weight, a, b):
    """The fused form: the C input channels taken to the M grid, the expansion there, squared, back to N."""
    x_size = (z.shape[-2], z.shape[-1])
    m = tuple(n + math.ceil(n / 2) for n in x_size)          # the 3/2 grid, as band_limited_square takes
    u = F.conv2d(ideal_resample(z, m), weight)
    u = torch.addcmul(b[:, None, None], a[:, None, None], u).square_()
    return ideal_resample(u, x_size)


def timed(fn, *args, repeats: int) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"efficientnet_b0 expansions, batch {args.batch}, {args.size} px, {args.threads} threads; best of "
          f"{args.repeats} (ms)")
    print(f"{'block':<12} {'C -> E':>11} {'N':>7} {'expanded':>9} {'fused':>8} {'ratio':>6} {'max rel diff':>13}")
    total = [0.0, 0.0]
    with torch.no_grad():
        for name, conv, bn, shape in expansions(args.size):
            z = torch.randn(args.batch, *shape)
            a, b = affine(bn)
            ref = square_expanded(z, conv.weight, a, b)
            diff = float((square_fused(z, conv.weight, a, b) - ref).abs().max() / ref.abs().max())
            t = [timed(f, z, conv.weight, a, b, repeats=args.repeats) for f in (square_expanded, square_fused)]
            total = [total[0] + t[0], total[1] + t[1]]
            print(f"{name:<12} {shape[0]:>4} -> {conv.out_channels:<5} {shape[1]:>3}x{shape[2]:<3} {1e3 * t[0]:9.1f} "
                  f"{1e3 * t[1]:8.1f} {t[1] / t[0]:6.2f} {diff:13.1e}")
    print(f"{'all':<12} {'':>11} {'':>7} {1e3 * total[0]:9.1f} {1e3 * total[1]:8.1f} {total[1] / total[0]:6.2f}")


if __name__ == "__main__":
    main()
