"""``afconvert recover SOURCE --data DIR --out FILE``: a converted model fitted back to its source on unlabelled
images of the user's domain (``afconvert.train.recover``), certified and written as a checkpoint."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from afconvert.cli.common import add_model_arguments, check_output_path, guarded, model_kwargs

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="afconvert recover",
        description="Convert a model (or take a converted checkpoint) and fit it back to its source on unlabelled "
                    "images of your domain: its activations fitted per channel, then block by block, then end to "
                    "end on the pre-logit features and logits; its BatchNorms then take the statistics of their "
                    "inputs (the same function, so fine-tuning in training mode starts from it). Prints fidelity to the source (feature cosine, top-1 "
                    "agreement) on images of the folder it did not fit on, before and after, and writes the "
                    "certified result. Started again with the same --out after an interruption, it resumes.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="DIR", help="unlabelled images: any folder of images (any depth), "
                   "or an IDX folder (its training split)")
    p.add_argument("--out", required=True, metavar="FILE", help="the recovered checkpoint (afconvert.load)")
    p.add_argument("--recipe", default="afc", help="recipe for a model given by name (default afc)")
    p.add_argument("--images", type=int, default=1024, help="images to fit on (default 1024)")
    p.add_argument("--held-out", type=int, default=256, help="images of the folder kept out of the fit, to measure "
                   "fidelity on (default 256)")
    p.add_argument("--calibration", type=int, default=256, metavar="N", help="a model given by name: fit each "
                   "activation per channel on N of the images first (default 256; 0: the recipe's fit)")
    p.add_argument("--steps", type=int, default=60, help="Adam steps per block (default 60)")
    p.add_argument("--distill-steps", type=int, default=150, help="end-to-end steps after the blocks, on the "
                   "pre-logit features and the logits (default 150; 0: none)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate per block (default 1e-3, cosine-annealed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--interpolation", default="bilinear", help="how images are resized to the input size (default "
                   "bilinear; the whole image, the model's normalisation)")
    return p


def _models(args):
    """(the model whose data config the images follow, the teacher, ``student(calibration)``: the converted model;
    a model given by name is converted then, its activations fitted on ``calibration`` (images or None))."""
    if Path(args.model).is_file():
        from afconvert.sources.checkpoint import load
        from afconvert.sources.pipeline import source_of
        student = load(args.model)
        teacher = source_of(student, args.model, fix="recover a checkpoint written by conversion (afconvert NAME "
                                                     "--out FILE), or give the model's name")
        return student, teacher, lambda calibration: student
    from afconvert.sources.models import create_source_model
    from afconvert.sources.pipeline import convert_source
    source, spec = create_source_model(args.model, weights=args.weights, pretrained=not args.no_pretrained,
                                       **model_kwargs(args))
    return source, source.eval(), lambda calibration: convert_source(source, spec, args.recipe, args.input_size,
                                                                     calibration=calibration)


def _images(args, model):
    """The folder's images as ``model`` sees them (its data config), at the input size."""
    from afconvert.data import data_config, load_images
    size = tuple(args.input_size) if args.input_size else tuple(data_config(model)["input_size"][1:])
    images, skipped = load_images(args.data, model, size, limit=args.images + args.held_out, flag="--data",
                                  interpolation=args.interpolation)
    print(f"source: {args.model}; {len(images)} images at {size[0]}x{size[1]}" +
          (f" ({skipped} unreadable skipped)" if skipped else ""))
    return images


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    check_output_path(args.out, "--out", "recovered.pt")
    from afconvert.sources.names import check_name
    if not Path(args.model).is_file():
        check_name(args.model)  # before importing torch: a misspelled name fails at once

    from afconvert.converter.engine import audit
    from afconvert.sources.checkpoint import save
    from afconvert.train.recover import RecoverConfig, recover, split_held_out

    import torch
    t0 = time.perf_counter()
    torch.manual_seed(0)    # random weights (--no-pretrained) and the fit are the same in a resumed run
    reader, teacher, convert = _models(args)
    images = _images(args, reader)
    fit, held = split_held_out(images, min(args.held_out, len(images) // 2))
    calibrated = not Path(args.model).is_file() and args.calibration > 0
    student = convert(fit[:args.calibration] if calibrated else None)
    print(f"{len(fit)} images to fit on, {len(held)} held out" +
          (f"; activations fitted on {min(args.calibration, len(fit))} of them" if calibrated else ""))
    cfg = RecoverConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, distill_steps=args.distill_steps)
    out = Path(args.out)
    result = recover(student, teacher, fit, held, cfg, state=out.with_name(out.name + ".partial"),
                     log=lambda msg: print(msg, file=sys.stderr))
    report = audit(student, input_size=student.afconvert_info.input_size)
    student.afconvert_report = report
    b, a = result["before"], result["after"]
    print(f"fidelity to the source on {len(held)} held-out images: feature cosine {b['cosine']:.3f} -> "
          f"{a['cosine']:.3f}, top-1 agreement {b['agreement']:.3f} -> {a['agreement']:.3f}")
    print(f"verdict: {report.verdict_text}")
    save(student, out)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s; load with afconvert.load('{out}')")
    return 0 if report.certified else 1


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert recover", _main, argv)
