"""``afconvert eval``: shift-robustness of one or more models on an ImageFolder, in one command.

    afconvert eval efficientnet_lite0 lite0_af.pt --data photos/ [--grid paper] [--json] [--plot f.png]

Data: ``DIR/<class folder>/<image>`` (``afconvert.data``: class folders map to the model's class
indices through ``--class-map FILE``, integer folder names, ImageNet synsets, or sorted order when
they are exactly the model's classes). Models, metrics and grids: ``afconvert.evaluation``.
Exit codes: 0, 2 with a one-line error, 3 when every prediction of a model is non-finite (its
results are still printed and written), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from afconvert.cli.common import check_output_path, guarded
from afconvert.evaluation import METRICS

__all__ = ["run"]

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert eval", description="Shift robustness of models on an ImageFolder "
                                "(accuracy, certified shift accuracy, consistency, ...).")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_CHECKPOINT",
                   help="timm name (convnext_tiny, efficientnet_lite0), torchvision:NAME, or an afconvert checkpoint")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder: DIR/<class>/<image>, or an IDX folder "
                   "(MNIST family: *-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz])")
    p.add_argument("--split", default="test", help="the split of an IDX --data folder: test (default, t10k) or train")
    p.add_argument("--metrics", default="default",
                   help=f"comma list of {', '.join(METRICS)}; aliases certified, default "
                        f"(accuracy,certified,consistency), all")
    p.add_argument("--grid", nargs="+", default=None, metavar="SPEC",
                   help="integer:LO..HI half:LO..HI fractional:N bilinear:N consistency:R crop:K curve:N "
                        "equivariance:DYxDX,..., or a preset: default (integer:0..3 half:0..3 fractional:4 bilinear:4 consistency:32 crop:8 curve:8), "
                        "paper (integer:0..31 half:0..31 fractional:12)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--forward-batch", type=int, default=None,
                   help="most images per model call when shifts are stacked (default: batch size on CPU, 4x on GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--limit", type=int, default=None, help="evaluate N images spread evenly over the data")
    p.add_argument("--class-map", metavar="FILE", help="text file, line i = the folder name of class i (timm's)")
    p.add_argument("--input-size", type=int, default=None, metavar="S", help="square input size (default: the model's)")
    p.add_argument("--weights", metavar="FILE", help="local weights for every model given by name")
    p.add_argument("--no-pretrained", action="store_true", help="random weights for models given by name")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of models given by name")
    p.add_argument("--seed", type=int, default=0, help="seed of the random consistency shifts (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON list (one object per model) instead of the table")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON to FILE (atomically)")
    p.add_argument("--plot", metavar="FILE.png", help="logit change vs sub-pixel shift and crop-shift accuracy curves")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_intermixed_args(list(argv))
    check_output_path(args.out, "--out", "eval.json")
    check_output_path(args.plot, "--plot", "eval.png")
    import torch

    from afconvert.atomic import atomic_write
    from afconvert.data import class_indices, list_images, read_class_map
    from afconvert.evaluation.report import format_table, to_json
    from afconvert.evaluation.runner import (
        EvalError,
        eval_device,
        num_classes_of,
        spread_indices,
        evaluate_model,
        parse_metrics,
        resolve_model,
    )
    from afconvert.evaluation.shift_grids import parse_grid_spec

    metrics = parse_metrics(args.metrics)
    grids = parse_grid_spec(args.grid)
    if args.batch_size < 1 or (args.forward_batch is not None and args.forward_batch < 1):
        raise EvalError("--batch-size and --forward-batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise EvalError("--limit must be >= 1")
    if args.plot:
        from afconvert.evaluation.plots import require_matplotlib
        require_matplotlib()
        metrics |= {"curve", "crop"}
    device = eval_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    folders, images = list_images(args.data, split=args.split)
    if args.class_map is not None:
        read_class_map(args.class_map)      # fail early, before loading models
    keep = spread_indices(len(images), args.limit)
    log = lambda msg: print(msg, file=sys.stderr)
    results = []
    for arg in args.models:
        cand = resolve_model(arg, args.weights, not args.no_pretrained, args.num_classes)
        mapping, how = class_indices(folders, args.class_map, num_classes_of(cand.model))
        samples = [(images[i][0], mapping[images[i][1]]) for i in keep]
        log(f"{arg}: {cand.source}")
        log(f"  data: {len(samples)} images in {len(folders)} class folders of {args.data} (class: {how})")
        res = evaluate_model(cand, samples, metrics, grids, device, dtype, args.batch_size, args.forward_batch,
                             args.seed, args.input_size, progress=False if args.no_progress else None)
        res["class_mapping"] = how
        results.append(res)
        cand.model.cpu()
    text = to_json(results)
    if args.out:
        atomic_write(args.out, text + "\n")
    if args.plot:
        from afconvert.evaluation.plots import plot_results
        plot_results(results, args.plot)
    if args.json:
        print(text)
    else:
        print(format_table(results))
        for path in (args.out, args.plot):
            if path:
                print(f"wrote {path}")
    broken = [r["model"] for r in results if r["predictions"] and r["nonfinite_predictions"] == r["predictions"]]
    if broken:
        log(f"afconvert eval: error: every prediction of {', '.join(broken)} has non-finite logits (the model is "
            f"numerically unstable); fix: re-convert it with the current afconvert (recipe afc) or fine-tune it")
        return 3
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``afconvert eval``: 0 on success, 2 with a one-line error, 3 when a model's predictions are all
    non-finite (its results are still printed and written), 130 when interrupted."""
    return guarded("afconvert eval", _main, list(sys.argv[1:] if argv is None else argv))
