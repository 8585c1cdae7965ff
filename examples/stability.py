"""Are converted models usable? max |logit| and float32 shift error of each converted model at 224 px.

    python examples/stability.py                       # the test zoo (default initialisation, recipe afc)
    python examples/stability.py resnet50 torchvision:resnet18 --size 160 --recipe afc-paper

For each model (default initialisation, as a user converts it): max |logit| of the original and of
the converted model on a standard-normal input (Nyquist bins zeroed), and the converted model's
float32 shift error (``certify.shift_error``, the CLI's figure): max over integer and fractional shifts of
max |f(shift x) - f(x)| / max |f(x)|. 'non-finite' when a logit is inf or NaN.
"""
import argparse
import sys
import time

import torch

import afconvert
from afconvert.converter.certify import DEFAULT_SHIFTS, random_input, shift_error
from afconvert.sources.models import create_source_model
from afconvert.sources.zoo import ZOO


def _fmt(v: float) -> str:
    return "non-finite" if v != v or v == float("inf") else f"{v:.2g}"


@torch.no_grad()
def measure(name: str, size: int, recipe: str) -> dict:
    torch.manual_seed(0)
    source, _ = create_source_model(name, pretrained=False)
    converted = afconvert.convert(source.eval(), recipe=recipe).eval()
    x = random_input(2, 3, (size, size))
    y_src, y = source(x), converted(x)
    finite = bool(torch.isfinite(y).all())
    shift = shift_error(converted, x, DEFAULT_SHIFTS, y0=y) if finite else float("nan")
    return {"model": name, "original": float(y_src.abs().max()),
            "converted": float(y.abs().max()) if finite else float("inf"), "shift": shift}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=ZOO)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--recipe", default="afc")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':<32} {'max|logit| original':>20} {'converted':>12} {'f32 shift error':>16}   (size {args.size}, "
          f"recipe {args.recipe})")
    for name in args.models:
        t0 = time.perf_counter()
        r = measure(name, args.size, args.recipe)
        print(f"{r['model']:<32} {_fmt(r['original']):>20} {_fmt(r['converted']):>12} {_fmt(r['shift']):>16}"
              f"   {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
