"""The README's cost table in one command: converted / original, side by side in one process.

    python examples/bench_table.py                                   # CPU, 2 threads, batch 8 / 4
    python examples/bench_table.py --device cuda --batch-size 64 --train-batch-size 64 --amp bf16

Per model (random weights, recipe afc, 224 px): inference and a training step (forward + backward),
median time per batch and peak memory of both models, and the ratios; then the machine it ran on. Both models run
in this plain process, with the C library's own allocator (or the one ``LD_PRELOAD`` names, reported);
``--matmul-products`` resamples with torch.matmul instead of oneDNN's 1x1 convolutions on a CPU. Markdown on stdout; ``--json FILE`` also
writes every measurement.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from afconvert import settings
from afconvert.atomic import atomic_write
from afconvert.converter.engine import convert
from afconvert.evaluation.benchmark import AMP_DTYPES, compare, malloc_setting
from afconvert.layers import products
from afconvert.sources.models import create_source_model

MODELS = ("convnext_tiny", "resnet50", "efficientnet_b0")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="inference batch (default 8)")
    p.add_argument("--train-batch-size", type=int, default=4, help="training-step batch (default 4)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None)
    p.add_argument("--resample", default="auto", choices=("auto", "fft", "matmul"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--options", type=json.loads, default=None, metavar="JSON",
                   help='recipe options, e.g. \'{"activation": {"fuse_linear": true}}\'')
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--matmul-products", action="store_true",
                   help="resampling products through torch.matmul (default on a CPU: oneDNN 1x1 convolutions)")
    args = p.parse_args()
    if args.matmul_products:
        settings.set_products("matmul")
    torch.set_num_threads(args.threads)
    amp = AMP_DTYPES.get(args.amp)
    size = (args.input_size, args.input_size)
    rows, results = [], []
    for name in args.models:
        source, _ = create_source_model(name, pretrained=False)
        t0 = time.perf_counter()
        converted = convert(source, "afc", input_size=size, check_numerics=False, options=args.options)
        seconds = time.perf_counter() - t0
        cells = [name, f"{seconds:.1f} s"]
        for train, batch in ((False, args.batch_size), (True, args.train_batch_size)):
            try:
                with settings.using(resample=args.resample):
                    res = compare(source, converted, batch, size, args.device, train, args.min_time,
                                  compile=args.compile, amp=amp)
            except torch.OutOfMemoryError:
                cells += ["out of memory"] * (1 if not train else 2)
                continue
            res.update(model=name, conversion_s=seconds, resample=args.resample)
            results.append(res)
            o, c = res["original"], res["converted"]
            cells.append(f"{res['ratio']['time']:.2f}x ({o['ms_per_batch']:.0f} -> {c['ms_per_batch']:.0f} ms)")
            if train and res["ratio"]["memory"] is None:
                cells.append("n/a")
            elif train:
                cells.append(f"{res['ratio']['memory']:.2f}x ({o['peak_mb']:.0f} -> {c['peak_mb']:.0f} MB)")
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        rows.append(cells)
        print(" | ".join(cells), flush=True)
    how = f"{args.input_size} px, recipe afc{' ' + json.dumps(args.options) if args.options else ''}, resample {args.resample}" + (f", autocast {args.amp}" if amp else "") + \
        (", torch.compile" if args.compile else "") + \
        f", products: {products.backend(args.device)}, malloc: {malloc_setting()}"
    print(f"\n{machine(args.device)}; {how}\n")
    print(f"| model | conversion | inference, batch {args.batch_size} | train step, batch {args.train_batch_size} "
          f"| peak memory (train) |\n|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if args.json:
        atomic_write(args.json, json.dumps({"machine": machine(args.device), "results": results}, indent=1))


if __name__ == "__main__":
    main()
