"""``afconvert bench MODEL``: the converted model's cost against the original's, side by side in one run.

Random weights by default (cost does not depend on them): no download. Prints, for inference or a
training step (``--train``), the median time per batch, images/s and peak memory of both models and
the ratios converted / original; ``--json`` prints them as one object.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

from afconvert.cli.common import guarded

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert bench", description="Time and memory of a converted model against "
                                "the original, side by side (torch.utils.benchmark).")
    p.add_argument("model", help="timm name (convnext_tiny) or torchvision:NAME")
    p.add_argument("--recipe", default="afc", help="recipe (default afc)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=(224, 224))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--train", action="store_true", help="a training step (forward + backward) instead of inference")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per model, at least")
    p.add_argument("--resample", default="auto", choices=("auto", "fft", "matmul"),
                   help="form of the ideal resampling and filters: auto (matmul for float32 and float64 maps up to "
                        "512 px, except float32 on CUDA with TF32 allowed; else FFT), fft or matmul (default auto)")
    p.add_argument("--compile", action="store_true", help="time both models through torch.compile")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="both models under autocast (the converted model's FFT, polynomial and norm layers keep "
                        "float32)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the converted model's top N operators by self time (torch.profiler)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    from afconvert.sources.names import check_name
    check_name(args.model)
    import torch

    from afconvert import settings
    from afconvert.converter.engine import convert
    from afconvert.evaluation.benchmark import AMP_DTYPES, compare, profile_table
    from afconvert.sources.models import create_source_model
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; fix: --device cpu")
    source, _ = create_source_model(args.model, pretrained=False)
    t0 = time.perf_counter()
    converted = convert(source, args.recipe, input_size=tuple(args.input_size), check_numerics=False)
    seconds = time.perf_counter() - t0
    with settings.using(resample=args.resample):
        amp = AMP_DTYPES.get(args.amp)
        res = compare(source, converted, args.batch_size, tuple(args.input_size), args.device, args.train,
                      args.min_time, compile=args.compile, amp=amp)
        table = profile_table(converted, args.batch_size, tuple(args.input_size), args.device, args.train,
                              args.profile, amp=amp) if args.profile else None
    res.update(model=args.model, recipe=args.recipe, conversion_s=seconds, resample=args.resample)
    if table is not None:
        res["profile"] = table
    if args.json:
        print(json.dumps(res))
        return 0
    h, w = args.input_size
    how = f"resample {args.resample}" + (", torch.compile" if args.compile else "") + \
        (f", autocast {args.amp}" if args.amp else "") + f", products: {res['products']}, malloc: {res['malloc']}"
    print(f"{args.model} ({args.recipe}): {res['mode']}, batch {args.batch_size} at {h}x{w} on {res['device']}, "
          f"{res['threads']} thread(s), {how}; conversion {seconds:.1f} s")
    print(f"  {'':<10} {'ms/batch':>10} {'images/s':>10} {'peak MB':>10}")
    for label in ("original", "converted"):
        r = res[label]
        mb = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"  {label:<10} {r['ms_per_batch']:10.1f} {r['images_per_s']:10.1f} {mb:>10}")
    mem = "n/a" if res["ratio"]["memory"] is None else f"{res['ratio']['memory']:.2f}x"
    print(f"  {'ratio':<10} {res['ratio']['time']:9.2f}x {'':>10} {mem:>10}")
    if table is not None:
        print(f"converted model, top {args.profile} operators by self time:\n{table}")
    return 0


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert bench", _main, argv)
