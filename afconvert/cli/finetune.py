"""``afconvert finetune STUDENT --data DIR --output DIR``: recover accuracy by distillation from the source.

STUDENT is an afconvert checkpoint (its teacher: the source model it was made from, with the same
weights) or a model name converted on the fly (``--weights``, ``--recipe``; its teacher: that source).
``--teacher NAME [--teacher-weights FILE]`` overrides. Runs as one process, or with
``torchrun --nproc_per_node=N -m afconvert finetune ...`` on N processes (DDP).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from afconvert.cli.common import guarded, model_kwargs
from afconvert.cli.training import add_training_arguments, report, training_config

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert finetune", description="Fine-tune a converted model by distillation "
                                "from its source model (timm-style options; torchrun for several processes).")
    p.add_argument("student", help="an afconvert checkpoint, or a model name to convert first")
    p.add_argument("--teacher", metavar="NAME", help="teacher model name (default: the student's source model)")
    p.add_argument("--teacher-weights", metavar="FILE", help="weights of --teacher")
    p.add_argument("--teacher-num-classes", type=int, default=None, help="classifier size of --teacher")
    p.add_argument("--weights", metavar="FILE", help="weights of a student given by name")
    p.add_argument("--no-pretrained", action="store_true", help="random weights for a student given by name")
    p.add_argument("--recipe", default="afc", help="recipe for a student given by name (default afc)")
    p.add_argument("--calibration", metavar="DIR", help="fit the activations of a student given by name on these "
                                                         "images first (per-channel least squares)")
    add_training_arguments(p)
    return p


def _models(args):
    """(student, teacher) as the arguments say."""
    from afconvert.sources.models import create_source_model
    from afconvert.sources.resolve import resolve
    kwargs = model_kwargs(args)
    resolved = resolve(args.student, weights=args.weights, pretrained=not args.no_pretrained, recipe=args.recipe,
                       calibration=args.calibration, **kwargs)
    student, teacher = resolved.model, resolved.source
    if resolved.checkpoint and args.teacher is None:
        from afconvert.sources.pipeline import source_of
        teacher = source_of(student, args.student, fix="pass --teacher NAME --teacher-weights FILE")
    if args.teacher is not None:
        n = args.teacher_num_classes or args.num_classes
        teacher_kwargs = {**kwargs, **({"num_classes": n} if n is not None else {})}
        teacher, _ = create_source_model(args.teacher, weights=args.teacher_weights, pretrained=True, **teacher_kwargs)
    for m in teacher.modules():  # in-place activations would hide their inputs from hooks (and cost nothing here)
        if hasattr(m, "inplace"):
            m.inplace = False
    return student, teacher


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    import os

    from afconvert.train.finetune import finetune
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    student, teacher = _models(args)
    return report(finetune(student, teacher, training_config(args), log=log), rank)


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert finetune", _main, argv)
