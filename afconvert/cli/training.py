"""What ``afconvert finetune`` and ``afconvert train`` share: the data, schedule, optimizer, checkpoint and device
arguments, the ``FinetuneConfig`` they describe, and the closing report. Nothing here imports torch."""
from __future__ import annotations

import argparse

__all__ = ["add_training_arguments", "training_config", "report"]


def add_training_arguments(p: argparse.ArgumentParser, lr: float = 1e-4, train_bn: bool = False) -> None:
    """The data, schedule, optimizer, checkpoint and device arguments that ``finetune`` and ``train`` share."""
    p.add_argument("--data", required=True, metavar="DIR", help="images (any layout; class folders give labels), or "
                   "an IDX folder (MNIST family: *-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz])")
    p.add_argument("--split", default="train", help="the split of an IDX --data folder: train (default) or test")
    p.add_argument("--val-data", metavar="DIR", help="held-out labelled images (class folders or an IDX folder): "
                   "top-1 after each epoch, in OUTPUT/val.csv and the curves")
    p.add_argument("--val-split", default="test", help="the split of an IDX --val-data folder (default test)")
    p.add_argument("--val-limit", type=int, default=None, metavar="N", help="validate on the first N images only")
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
        data=args.data, output=args.output, split=args.split, val_data=args.val_data, val_split=args.val_split,
        val_limit=args.val_limit, epochs=args.epochs, steps=args.steps,
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
        if summary.get("val_top1") is not None:
            print(f"validation top-1: {summary['val_top1']:.2f} %")
        print(f"certificate after training: {summary['verdict']}")
    return 0 if rank != 0 or summary["stable"] else 1
