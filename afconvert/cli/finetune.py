"""``afconvert finetune STUDENT --data DIR --output DIR``: recover accuracy by distillation from the source.

STUDENT is an afconvert checkpoint (its teacher: the source model it was made from, with the same
weights) or a model name converted on the fly (``--weights``, ``--recipe``; its teacher: that source).
``--teacher NAME [--teacher-weights FILE]`` overrides. Runs as one process, or with
``torchrun --nproc_per_node=N -m afconvert finetune ...`` on N processes (DDP).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from afconvert.cli.common import guarded, model_kwargs

__all__ = ["run"]


def add_training_arguments(p: argparse.ArgumentParser, lr: float = 1e-4, train_bn: bool = False) -> None:
    """The data, schedule, optimizer, checkpoint and device arguments that ``finetune`` and ``train`` share."""
    p.add_argument("--data", required=True, metavar="DIR", help="images (any layout; class folders give labels), or "
                   "an IDX folder (MNIST family: *-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz])")
    p.add_argument("--split", default="train", help="the split of an IDX --data folder: train (default) or test")
    p.add_argument("--output", required=True, metavar="DIR", help="run folder: last.pt, log.csv, curves.png, final.pt")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of models given by name")
    p.add_argument("--in-chans", type=int, default=None, help="input channels of models given by name (1: grayscale)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=10)
    length.add_argument("--steps", type=int, default=None, help="total optimizer steps (instead of --epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="images per process and step")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None)
    p.add_argument("--scale", nargs=2, type=float, metavar=("LO", "HI"), default=(0.08, 1.0),
                   help="random-resized-crop area range (timm's; default 0.08 1.0)")
    p.add_argument("--opt", default="adamw", help="timm optimizer name (default adamw)")
    p.add_argument("--lr", type=float, default=lr, help=f"(default {lr:g})")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--sched", default="cosine", help="timm scheduler name (default cosine)")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--grad-accum-steps", type=int, default=1, help="batches per optimizer update")
    p.add_argument("--amp", action="store_true", help="mixed precision (FFT, polynomial and LayerNorm layers stay "
                                                      "float32)")
    p.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (0: off)")
    p.add_argument("--model-ema", action="store_true", help="keep timm's ModelEmaV3; final.pt is the EMA")
    p.add_argument("--model-ema-decay", type=float, default=0.999)
    if train_bn:
        p.add_argument("--freeze-bn", dest="train_bn", action="store_false", help="keep BatchNorm statistics fixed")
    else:
        p.add_argument("--train-bn", action="store_true", help="update BatchNorm statistics (frozen by default)")
    p.add_argument("--aa", dest="auto_augment", default="rand-m9-mstd0.5", help="timm auto-augment ('' for none)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")


def training_config(args, **extra):
    """The ``FinetuneConfig`` the shared arguments (and ``extra`` fields) describe."""
    from afconvert.train.finetune import FinetuneConfig
    return FinetuneConfig(
        data=args.data, output=args.output, split=args.split, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, input_size=tuple(args.input_size) if args.input_size else None,
        scale=tuple(args.scale), opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, sched=args.sched,
        warmup_epochs=args.warmup_epochs, clip_grad=args.clip_grad, grad_accum_steps=args.grad_accum_steps,
        amp=args.amp, amp_dtype=args.amp_dtype, mixup=args.mixup, cutmix=args.cutmix, model_ema=args.model_ema,
        model_ema_decay=args.model_ema_decay, train_bn=args.train_bn, auto_augment=args.auto_augment or None,
        checkpoint_every=args.checkpoint_every, seed=args.seed, workers=args.workers, device=args.device,
        resume=args.resume, progress=not args.no_progress, **extra)


def report(summary: dict, rank: int) -> int:
    """Print a run's summary (rank 0); the exit code: 1 when the trained model is numerically unstable."""
    if rank == 0:
        print(f"trained {summary['steps']} steps on {summary['world_size']} process(es); "
              f"{summary['skipped_images']} unreadable image(s) skipped")
        print(f"wrote {summary['final']} (afconvert.load)" + (f" and {summary['curves']}" if summary["curves"] else ""))
        print(f"certificate after training: {summary['verdict']}")
    return 0 if rank != 0 or summary["stable"] else 1


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
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--task-loss-weight", type=float, default=0.0, help="cross-entropy on the folder labels")
    p.add_argument("--reconstruct", action="store_true", help="block-wise reconstruction before distillation: each "
                                                              "block fitted to its source block, in network order")
    p.add_argument("--reconstruct-steps", type=int, default=100, help="Adam steps per block")
    p.add_argument("--reconstruct-batches", type=int, default=4, help="batches of training crops to fit blocks on")
    p.add_argument("--reconstruct-lr", type=float, default=1e-3)
    add_training_arguments(p)
    return p


def _models(args):
    """(student, teacher) as the arguments say."""
    from afconvert.sources.checkpoint import load
    from afconvert.sources.models import create_source_model
    from afconvert.train.finetune import FinetuneError
    kwargs = model_kwargs(args)
    if Path(args.student).is_file():
        student = load(args.student)
        teacher = None
        if args.teacher is None:
            src = student.afconvert_info.get("source") or {}
            teacher, _ = create_source_model(f"{src.get('library', 'timm')}:{src.get('name')}", pretrained=False,
                                             **src.get("kwargs", {}))
            own, mine = teacher.state_dict(), student.state_dict()
            bad = [k for k, v in own.items() if k not in mine or mine[k].shape != v.shape]
            if bad:
                raise FinetuneError(f"cannot rebuild the teacher from {args.student} ({len(bad)} of its weights, "
                                    f"e.g. {bad[0]}, are not in the student); fix: pass --teacher NAME "
                                    f"--teacher-weights FILE")
            teacher.load_state_dict({k: mine[k] for k in own}, strict=True)
    else:
        from afconvert.sources.pipeline import build
        built = build(args.student, weights=args.weights, pretrained=not args.no_pretrained, recipe=args.recipe,
                      calibration=args.calibration, **kwargs)
        student, teacher = built.converted, built.source
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
    cfg = training_config(args, kd_temperature=args.kd_temperature, task_loss_weight=args.task_loss_weight,
                          reconstruct=args.reconstruct, reconstruct_steps=args.reconstruct_steps,
                          reconstruct_batches=args.reconstruct_batches, reconstruct_lr=args.reconstruct_lr)
    return report(finetune(student, teacher, cfg, log=log), rank)


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert finetune", _main, argv)
