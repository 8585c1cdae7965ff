"""The settings of a training run (``afconvert finetune`` and ``afconvert train``): one dataclass whose fields are
also the command-line flags (``afconvert.cli.training`` builds each flag from its field: name, type, default and
the ``metadata`` below). Imports nothing heavy, so ``--help`` answers without torch.

Field metadata: ``help``; ``metavar``; ``choices``; ``flag`` (a flag name other than ``--the-field-name``);
``group`` (flags of one mutually exclusive group); ``distill`` (only where there is a teacher: ``finetune``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FinetuneConfig", "BLEND_ORDERS"]

BLEND_ORDERS = ("all", "progressive")   # every replaced layer at once, or front to back


def _f(default, help: str = "", **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FinetuneConfig:
    data: str = field(metadata={"metavar": "DIR", "help": "images (any layout; class folders give labels), or an IDX "
                                "folder (MNIST family: *-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz])"})
    output: str = field(metadata={"metavar": "DIR", "help": "run folder: last.pt, log.csv, curves.png, final.pt"})
    split: str = _f("train", "the split of an IDX --data folder: train or test")
    val_data: str | None = _f(None, "held-out labelled images (class folders or an IDX folder): top-1 after each "
                              "epoch, in OUTPUT/val.csv and the curves", metavar="DIR")
    val_split: str = _f("test", "the split of an IDX --val-data folder")
    val_limit: int | None = _f(None, "validate on the first N images only", metavar="N")
    epochs: int = _f(10, "passes over the data", group="length")
    steps: int | None = _f(None, "total optimizer steps (instead of --epochs)", group="length")
    batch_size: int = _f(16, "images per process and step")
    input_size: tuple[int, int] | None = _f(None, "training crop (default: the model's data config)",
                                            metavar=("H", "W"))
    scale: tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range (timm's)", metavar=("LO", "HI"))
    auto_augment: str = _f("rand-m9-mstd0.5", "timm auto-augment ('' for none)", flag="--aa")
    opt: str = _f("adamw", "timm optimizer name")
    lr: float = _f(1e-4, "peak learning rate")
    weight_decay: float = _f(0.0)
    sched: str = _f("cosine", "timm scheduler name")
    warmup_epochs: int = _f(0)
    clip_grad: float | None = _f(None, "gradient norm clip")
    grad_accum_steps: int = _f(1, "batches per optimizer update")
    amp: bool = _f(False, "mixed precision (FFT, polynomial and LayerNorm layers stay float32)")
    amp_dtype: str = _f("float16", choices=("float16", "bfloat16"))
    mixup: float = _f(0.0, "timm Mixup alpha (0: off)")
    cutmix: float = _f(0.0, "timm CutMix alpha (0: off)")
    model_ema: bool = _f(False, "keep timm's ModelEmaV3; final.pt is the EMA")
    model_ema_decay: float = _f(0.999)
    train_bn: bool = _f(True, "update BatchNorm statistics (the converted network's activations are not the "
                        "source's; docs/finetuning.md: what freezing them costs)")
    kd_temperature: float = _f(1.0, "distillation temperature", distill=True)
    task_loss_weight: float = _f(0.0, "cross-entropy on the data's labels, added to the distillation loss",
                                 distill=True)
    reconstruct: bool = _f(False, "block-wise reconstruction before distillation: each block fitted to its source "
                           "block, in network order", distill=True)
    reconstruct_steps: int = _f(100, "Adam steps per block", distill=True)
    reconstruct_batches: int = _f(4, "batches of training crops to fit blocks on", distill=True)
    reconstruct_lr: float = _f(1e-3, distill=True)
    blend: float = _f(0.0, "progressive replacement: each replaced layer as lambda * source + (1 - lambda) * "
                      "alias-free, lambda annealed from 1 to 0 over the first fraction F of the steps (0: off); not "
                      "alias-free until it ends", metavar="F", distill=True)
    blend_order: str = _f("all", "all layers at once, or front to back", choices=BLEND_ORDERS,
                          distill=True)
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints", metavar="STEPS")
    seed: int = _f(0)
    workers: int = _f(0, "data-loading processes")
    device: str = _f("auto", "cpu, cuda or auto")
    resume: bool = _f(False, "continue the run in --output from its last checkpoint")
    progress: bool = _f(True, "a progress bar")
