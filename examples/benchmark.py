"""Forward-pass cost of a converted model against its source, measured side by side in one run.

    python examples/benchmark.py convnext_tiny --input-size 224 224 --batch 8 [--recipe afc-paper] [--device cuda]

Prints milliseconds per batch for both and the ratio converted / original (no weights needed).
"""
import argparse

import torch
import torch.utils.benchmark as benchmark

import afconvert
from afconvert.sources.models import create_source_model


def _time(model, x, repeats: float) -> float:
    """Median milliseconds per forward (torch.utils.benchmark: warm-up, CUDA synchronisation, threads)."""
    timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        return timer.blocked_autorange(min_run_time=repeats).median * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="convnext_tiny")
    p.add_argument("--recipe", default="afc")
    p.add_argument("--input-size", nargs=2, type=int, default=(224, 224))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=float, default=3.0, help="seconds of timing per model (at least)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    source, _ = create_source_model(args.model, pretrained=False)
    converted = afconvert.convert(source, args.recipe, input_size=args.input_size)
    x = torch.randn(args.batch, 3, *args.input_size, device=args.device)
    rows = {}
    for label, model in (("original", source), ("converted", converted)):
        rows[label] = _time(model.to(args.device).eval(), x, args.repeats)
    print(f"{args.model} ({args.recipe}), batch {args.batch} at {args.input_size[0]}x{args.input_size[1]} "
          f"on {args.device}, {torch.get_num_threads()} threads")
    for label, ms in rows.items():
        print(f"  {label:<10} {ms:9.1f} ms / batch")
    print(f"  ratio      {rows['converted'] / rows['original']:9.2f} x")


if __name__ == "__main__":
    main()
