"""Fine-tuning a converted model by distillation from its source model, timm-style, on one CPU or many
GPUs (``torchrun``: ``torch.distributed`` DDP, NCCL on GPUs and gloo on CPUs, a ``DistributedSampler``);
without a teacher, the same loop trains from the labels alone (``afconvert train``: cross-entropy).

The loop is split as timm's train.py is: ``setup`` builds the run (data, models, optimizer, scheduler, EMA,
resumed state), ``train_one_step`` takes one optimizer update, ``validate`` measures top-1 on held-out
images, a ``Checkpointer`` (``afconvert.train.checkpointer``) writes and resumes ``OUTPUT/last.pt``, and
``finetune`` runs them. ``register_step_hook(fn)`` calls ``fn(step)`` after every update (and its checkpoint).

* Data: every image under ``--data`` (class folders give labels for the optional task loss; unlabeled
  folders work) or an IDX folder's split, timm's training transform (random resized crop, flip, RandAugment)
  at the student's mean/std. Each sample's augmentation is seeded by (seed, epoch, index): a run is
  reproducible whatever the number of workers, and a resumed run sees exactly the images the killed one
  would have. ``--val-data`` (an IDX folder's ``--val-split``, or labelled class folders): top-1 after each
  epoch, in ``OUTPUT/val.csv`` and the curves.
* Optional block-wise reconstruction first (``--reconstruct``, ``afconvert.train.reconstruct``), and optional
  progressive replacement (``--blend F``, ``afconvert.train.blend``): each replaced layer a blend of its source
  and alias-free form, lambda annealed from 1 to 0 over the first fraction F of the updates, after which the
  network is exactly the converted one (it is not alias-free before: the log and ``log.csv`` say so).
* Loss: ``kd_loss`` (KL at ``--kd-temperature``, non-finite rows left out) plus, with
  ``--task-loss-weight``, cross-entropy on the labels; without a teacher, that cross-entropy alone.
  timm's ``create_optimizer_v2``, ``create_scheduler_v2`` (stepped per update), ``ModelEmaV3`` and ``Mixup``
  (``--mixup`` / ``--cutmix``: teacher and student see the same mixed images). BatchNorm statistics train
  (``--no-train-bn`` freezes them, e.g. for a few images per batch). ``--grad-accum-steps N``: one update per N
  batches.
* Mixed precision (``--amp``, ``--amp-dtype``): torch autocast; the FFT, polynomial and LayerNorm
  layers compute in float32 inside it (``promote_half``); float16 uses a ``GradScaler``.
* Outputs: ``OUTPUT/last.pt`` every ``--checkpoint-every`` updates (the first as soon as the run starts),
  ``OUTPUT/teacher.pt`` (the teacher's weights, the same on every process and after a resume),
  ``OUTPUT/log.csv`` (one row per update), ``OUTPUT/curves.png`` (loss, agreement with the teacher or the
  labels, validation top-1), ``OUTPUT/final.pt`` (an afconvert checkpoint: ``afconvert.load``, with the data
  config it was trained at).
* Training changes only weights: every layer keeps its class, so the certificate still holds; the final
  report re-runs it, numerics included.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from afconvert.atomic import atomic_savefig, atomic_torch_save, atomic_write
from afconvert.data import (
    DataError,
    ImageDataset,
    data_config,
    image_mode,
    set_data_config,
    training_samples,
)
from afconvert.train.blend import BLEND_ORDERS, blend, blended, set_blend, unblend
from afconvert.train.checkpointer import TRAIN_FORMAT, Checkpointer, restart_count, set_rng_state
from afconvert.train.config import FinetuneConfig
from afconvert.train.distill import agreement, kd_loss

__all__ = ["FinetuneConfig", "FinetuneError", "finetune", "setup", "train_one_step", "validate",
           "register_step_hook", "TRAIN_FORMAT"]

_step_hooks: OrderedDict[int, Callable[[int], None]] = OrderedDict()


class FinetuneError(DataError):
    """A fine-tuning input that cannot work; the message names the fix."""


def register_step_hook(hook: Callable[[int], None]) -> RemovableHandle:
    """Call ``hook(step)`` after every optimizer update of every run (after that step's checkpoint, if one
    is due); ``.remove()`` the returned handle to stop."""
    handle = RemovableHandle(_step_hooks)
    _step_hooks[handle.id] = hook
    return handle


class _SeededImages(torch.utils.data.Dataset):
    """``ImageDataset`` whose random augmentation is a function of (seed, epoch, index) alone."""

    def __init__(self, images: ImageDataset, seed: int):
        self.images, self.seed, self.epoch = images, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        s = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % (2 ** 31)
        random.seed(s)
        np.random.seed(s)
        # the CPU generator the transforms draw from (torch.manual_seed also queues a CUDA seeding: 60x the time)
        torch.random.default_generator.manual_seed(s)
        return self.images[i]


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        # torchrun's env:// store, its keys under this attempt's prefix: the workers that torchrun
        # (--max-restarts) restarts share the store of the attempt before, whose stale addresses would
        # otherwise be read as theirs (gloo: "connectFullMesh failed ... Connection refused")
        store, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"afconvert/attempt_{restart_count()}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device if device not in ("auto", "cuda") else "cpu")


def _all_mean(values: list[float], world: int, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _same_teacher(teacher: nn.Module, path: Path, resuming: bool, rank: int, world: int) -> None:
    """Every process, and a resumed run, distils from the very same teacher: rank 0's weights are
    broadcast, and kept in ``OUTPUT/teacher.pt`` for ``--resume`` (a randomly initialised or
    re-downloaded teacher would differ)."""
    if resuming:
        if not path.is_file():
            raise FinetuneError(f"--resume: no {path} (the teacher of the run); fix: start a new run in another "
                                f"--output")
        state = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(state, strict=True)
    elif world > 1:
        for t in teacher.state_dict().values():
            dist.broadcast(t, src=0)
    if rank == 0 and not resuming:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        atomic_torch_save(path, state)


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _amp(cfg: FinetuneConfig, device: torch.device):
    """(autocast context factory, GradScaler) as ``--amp`` / ``--amp-dtype`` say."""
    if not cfg.amp:
        return contextlib.nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.amp_dtype not in dtypes:
        raise FinetuneError(f"--amp-dtype {cfg.amp_dtype}: unknown; fix: float16 or bfloat16")
    dtype = dtypes[cfg.amp_dtype]
    return (lambda: torch.autocast(device.type, dtype=dtype)), \
        torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def _reconstruction_batches(images: "_SeededImages", cfg: FinetuneConfig, device) -> list[torch.Tensor]:
    """``cfg.reconstruct_batches`` batches of training crops, drawn with their own seed (epoch -1)."""
    images.epoch = -1
    n = cfg.reconstruct_batches * cfg.batch_size
    items = [images[i % len(images)] for i in range(n)]
    x = torch.stack([it[0] for it in items if it is not None])
    if len(x) == 0:
        raise FinetuneError("no readable image for --reconstruct; fix: point --data at readable images")
    return [b.to(device) for b in torch.split(x, cfg.batch_size)]


def _read_csv(path: Path, upto: int) -> list[dict]:
    """The rows of a run's CSV up to ``upto`` (its step column), as a resumed run keeps them."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["step"]) <= upto]


def _plot(rows: list[dict], val: list[dict], path: Path, versus: str = "the teacher") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 3.5))
    axes[0].plot(steps, [float(r["loss"]) for r in rows])
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    axes[1].plot(steps, [100 * float(r["agreement"]) for r in rows])
    axes[1].set(xlabel="step", ylabel=f"top-1 agreement with {versus} (%)", ylim=(-2, 102), title="agreement (batch)")
    if val:
        axes[2].plot([float(r["epoch"]) for r in val], [float(r["top1"]) for r in val], marker="o")
        axes[2].set(xlabel="epoch", ylabel="top-1 (%)", title="validation")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=100)
    plt.close(fig)
    return True


@dataclass
class _Run:
    """What ``setup`` builds and the loop changes: one run's data, models, optimizer and progress."""
    cfg: FinetuneConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    checkpointer: Checkpointer
    student: nn.Module
    teacher: nn.Module | None
    images: _SeededImages
    sampler: torch.utils.data.DistributedSampler
    dcfg: dict
    size: tuple[int, int]
    chans: int
    classes: int
    per_epoch: int                  # optimizer updates per epoch
    total: int                      # optimizer updates in the run
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object | None
    scaler: torch.amp.GradScaler
    autocast: Callable
    mixup: object | None
    blend_until: int                # the update at which every blend reaches lambda = 0 (0: no blend)
    step: int = 0
    reconstructed: bool = False
    rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    skipped: int = 0
    model: nn.Module | None = None  # the student, DDP-wrapped on several processes

    def wrap(self) -> None:
        self.model = nn.parallel.DistributedDataParallel(self.student) if self.world > 1 else self.student

    def save(self) -> None:
        """``last.pt`` (every rank takes part)."""
        self.checkpointer.save(
            step=self.step, config=asdict(self.cfg), model=self.student.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None, reconstructed=self.reconstructed)


def _check_models(student, teacher, cfg, folders, samples, chans, size, device) -> int:
    """The student's number of classes, after checking teacher and data agree with it."""
    if teacher is None and (not folders or any(c < 0 for _, c in samples)):
        raise FinetuneError(f"training from labels needs labelled images, and {cfg.data} has none; fix: class "
                            f"folders (DIR/<class>/<image>) or an IDX folder")
    if teacher is None and (cfg.reconstruct or cfg.blend):
        raise FinetuneError("--reconstruct and --blend start from a teacher (the source model), and this run has "
                            "none; fix: drop them")
    if not 0.0 <= cfg.blend <= 1.0 or cfg.blend_order not in BLEND_ORDERS:
        raise FinetuneError(f"--blend {cfg.blend} --blend-order {cfg.blend_order}: fix: a fraction of the run in "
                            f"[0, 1] and an order among {', '.join(BLEND_ORDERS)}")
    with torch.no_grad():
        probe = torch.zeros(1, chans, *size, device=device)
        k_s = student.eval()(probe).shape[-1]
        k_t = teacher(probe).shape[-1] if teacher is not None else k_s
    if k_s != k_t:
        raise FinetuneError(f"the student has {k_s} classes, the teacher {k_t}; fix: a teacher of the same classes "
                            f"(--teacher, --num-classes)")
    if (cfg.task_loss_weight or teacher is None) and folders and len(folders) > k_s:
        raise FinetuneError(f"{len(folders)} classes in the data for a {k_s}-class model; fix: --num-classes "
                            f"{len(folders)}" + (" or --task-loss-weight 0" if teacher is not None else ""))
    return k_s


def _blend(run: _Run, log) -> None:
    """Wrap the replaced layers in blends (lambda = 1), and the EMA's copy alike."""
    paths = blend(run.student, run.teacher)
    if run.ema is not None:
        blend(run.ema.module, run.teacher)
    if not paths:
        raise FinetuneError("--blend: no layer of the student differs from its teacher's; fix: drop --blend, or "
                            "distil from the source model (no --teacher)")
    log(f"blend: {len(paths)} replaced layers as lambda * source + (1 - lambda) * alias-free ({run.cfg.blend_order}), "
        f"annealed to 0 by step {run.blend_until}; NOT alias-free until then")


def setup(student: nn.Module, teacher: nn.Module | None, cfg: FinetuneConfig, log=print) -> _Run:
    """Build the run ``cfg`` describes, resumed from ``OUTPUT/last.pt`` when there is one to resume."""
    rank, world, device = _distributed(cfg.device)
    out = Path(cfg.output)
    checkpointer = Checkpointer(out, rank, world)
    state = checkpointer.resume_state(cfg.resume)
    samples, folders = training_samples(cfg.data, split=cfg.split)
    from timm.data import Mixup, create_transform
    dcfg = data_config(student)
    size = tuple(cfg.input_size or dcfg["input_size"][1:])
    chans = dcfg["input_size"][0]
    transform = create_transform(input_size=(chans, *size), is_training=True, auto_augment=cfg.auto_augment or None,
                                 scale=tuple(cfg.scale),
                                 mean=dcfg["mean"], std=dcfg["std"], interpolation=dcfg["interpolation"])
    images = _SeededImages(ImageDataset(samples, transform, image_mode(dcfg)), cfg.seed)
    sampler = torch.utils.data.DistributedSampler(images, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    accum = max(1, int(cfg.grad_accum_steps))
    per_epoch = len(sampler) // (cfg.batch_size * accum)
    if per_epoch == 0:
        raise FinetuneError(f"{len(samples)} images for batches of {cfg.batch_size} x {accum} accumulation step(s) "
                            f"on {world} process(es); fix: a smaller --batch-size or --grad-accum-steps, or more "
                            f"images")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise FinetuneError(f"--mixup / --cutmix need an even --batch-size, got {cfg.batch_size}; fix: an even one")
    total = cfg.steps or cfg.epochs * per_epoch

    student.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    classes = _check_models(student, teacher, cfg, folders, samples, chans, size, device)
    autocast, scaler = _amp(cfg, device)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=classes) \
        if cfg.mixup or cfg.cutmix else None
    if teacher is not None:
        _same_teacher(teacher, out / "teacher.pt", state is not None, rank, world)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    optimizer = create_optimizer_v2(student, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=math.ceil(total / per_epoch),
                                       warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=per_epoch)
    ema = ModelEmaV3(student, decay=cfg.model_ema_decay) if cfg.model_ema else None
    run = _Run(cfg=cfg, rank=rank, world=world, device=device, out=out, checkpointer=checkpointer, student=student,
               teacher=teacher, images=images, sampler=sampler, dcfg=dcfg, size=size, chans=chans, classes=classes,
               per_epoch=per_epoch, total=total, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler,
               autocast=autocast, mixup=mixup, blend_until=math.ceil(cfg.blend * total) if cfg.blend else 0)
    if run.blend_until and (state is None or int(state["step"]) < run.blend_until):
        _blend(run, log)        # the blended parameters are frozen copies: the optimizer's stay the student's
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        run.step = int(state["step"])
        run.reconstructed = bool(state.get("reconstructed"))
        set_rng_state(state["rng"][rank])
        run.rows = _read_csv(out / "log.csv", run.step)
        run.val_rows = _read_csv(out / "val.csv", run.step)
        restarted = f" (torchrun restart {restart_count()})" if not cfg.resume else ""
        log(f"resumed {checkpointer.path} at step {run.step}{restarted}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if run.rows:
            _write_csv(out / "log.csv", run.rows)
    if state is None:
        run.save()              # a run killed from here on resumes with --resume
    if cfg.reconstruct and not run.reconstructed and run.step == 0:
        _reconstruct(run, log)
    run.wrap()
    return run


def _reconstruct(run: _Run, log) -> None:
    """Block-wise reconstruction (rank 0), its weights broadcast to every process; checkpointed."""
    wrapped = bool(blended(run.student))      # blocks are matched layer for layer: fitted unblended
    if wrapped:
        unblend(run.student)
    if run.rank == 0:
        from afconvert.train.reconstruct import reconstruct
        batches = _reconstruction_batches(run.images, run.cfg, run.device)
        reconstruct(run.student, run.teacher, batches, steps=run.cfg.reconstruct_steps, lr=run.cfg.reconstruct_lr,
                    log=log)
    if wrapped:
        blend(run.student, run.teacher)
    if run.world > 1:
        for t in run.student.state_dict().values():
            dist.broadcast(t, src=0)
    if run.ema is not None:
        from timm.utils import ModelEmaV3
        run.ema = ModelEmaV3(run.student, decay=run.cfg.model_ema_decay)
    run.reconstructed = True
    run.save()


def train_one_step(run: _Run, group: list) -> dict:
    """One optimizer update on ``group`` (``grad_accum_steps`` collated batches); returns its log row."""
    cfg, model, student, teacher = run.cfg, run.model, run.student, run.teacher
    accum = len(group)
    t0 = time.perf_counter()
    if run.blend_until:
        lam = set_blend(student, run.step / run.blend_until, cfg.blend_order) if blended(student) else 0.0
    model.train()
    if not cfg.train_bn:
        _freeze_bn(student)
    run.optimizer.zero_grad(set_to_none=True)
    losses, agrees, seen = [], [], 0
    for i, (x, y, skipped) in enumerate(group):
        run.skipped += skipped
        if x is None:
            x, y = torch.zeros(0, run.chans, *run.size), torch.zeros(0, dtype=torch.long)
        x, y = x.to(run.device), y.to(run.device)
        soft = None
        if run.mixup is not None and len(x) % 2 == 0 and len(x):
            x, soft = run.mixup(x, y.clamp_min(0))
        sync = run.world == 1 or i == accum - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with run.autocast():
                with torch.no_grad():
                    t = teacher(x).float() if teacher is not None else F.one_hot(y.clamp_min(0), run.classes)
                s = model(x)
            s = s.float()
            loss = kd_loss(s, t, cfg.kd_temperature)[0] if teacher is not None else None
            if loss is None:
                loss = s.sum() * 0.0          # no finite row: a zero step (every rank still takes part)
            weight = cfg.task_loss_weight if teacher is not None else 1.0
            if weight and len(y) and (y >= 0).all():
                ok = torch.isfinite(s).all(1)
                if ok.any():
                    target = soft if soft is not None else F.one_hot(y, run.classes).float()
                    task = -(target[ok] * F.log_softmax(s[ok], 1)).sum(1).mean()
                    loss = loss + weight * task
            run.scaler.scale(loss / accum).backward()
        losses.append(float(loss.detach()))
        agrees.append(agreement(s.detach(), t).float().mean().item() if len(x) else 0.0)
        seen += len(x)
    if cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    run.scheduler.step_update(num_updates=run.step)
    if run.ema is not None:
        run.ema.update(student, step=run.step)
    mean_loss, mean_agree = _all_mean([sum(losses) / accum, sum(agrees) / accum], run.world, run.device)
    rate = seen * run.world / max(time.perf_counter() - t0, 1e-9)
    row = {"step": run.step, "epoch": (run.step - 1) // run.per_epoch, "loss": f"{mean_loss:.6g}",
           "agreement": f"{mean_agree:.4f}", "lr": f"{run.optimizer.param_groups[0]['lr']:.6g}"}
    if run.blend_until:
        row["blend"] = f"{lam:.4f}"
    row["images_per_s"] = f"{rate:.1f}"
    return row


def _validation_images(cfg: FinetuneConfig, dcfg: dict, chans: int, size) -> ImageDataset:
    from timm.data import create_transform
    samples, _ = training_samples(cfg.val_data, flag="--val-data", split=cfg.val_split)
    if any(c < 0 for _, c in samples):
        raise FinetuneError(f"--val-data {cfg.val_data} has no labels; fix: class folders or an IDX folder")
    if cfg.val_limit:
        samples = samples[:cfg.val_limit]
    transform = create_transform(input_size=(chans, *size), is_training=False, mean=dcfg["mean"], std=dcfg["std"],
                                 interpolation=dcfg["interpolation"], crop_pct=dcfg.get("crop_pct"),
                                 crop_mode=dcfg.get("crop_mode"))
    return ImageDataset(samples, transform, image_mode(dcfg))


@torch.no_grad()
def validate(model: nn.Module, images: ImageDataset, batch_size: int, device, rank: int = 0, world: int = 1) -> float:
    """Top-1 (%) of ``model`` on ``images`` (each process its share, summed over all)."""
    was = model.training
    model.eval()
    share = list(range(rank, len(images), world))
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=share,
                                         collate_fn=ImageDataset.collate)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, _ in loader:
        if x is None:
            continue
        counts[0] += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        counts[1] += len(y)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was)
    return float(100 * counts[0] / counts[1]) if counts[1] else float("nan")


def _end_of_blend(run: _Run, log) -> None:
    """lambda = 0 everywhere: the alias-free modules replace the blends; the network is the converted one."""
    n = unblend(run.student)
    if run.ema is not None:
        unblend(run.ema.module)
    run.wrap()
    log(f"blend done at step {run.step}: {n} layers are their alias-free form alone")


def finetune(student: nn.Module, teacher: nn.Module | None, cfg: FinetuneConfig, log=print) -> dict:
    """Distil ``teacher`` into the converted ``student`` (trained in place) as ``cfg`` says, or, with no teacher,
    train it from the data's labels; returns a summary {"steps", "final", "verdict", "val_top1", ...}. Rank 0
    writes every output."""
    run = setup(student, teacher, cfg, log)
    val = _validation_images(cfg, run.dcfg, run.chans, run.size) if cfg.val_data else None
    out, accum = run.out, max(1, int(cfg.grad_accum_steps))
    def validation() -> None:
        top1 = validate(run.student, val, cfg.batch_size, run.device, run.rank, run.world)
        run.val_rows.append({"step": run.step, "epoch": f"{run.step / run.per_epoch:.4g}", "top1": f"{top1:.2f}"})
        log(f"step {run.step} (epoch {run.step / run.per_epoch:.3g}): validation top-1 {top1:.2f} %")

    if val is not None and run.step == 0 and not run.val_rows:
        validation()            # where training starts from
    from tqdm import tqdm
    bar = tqdm(total=run.total, initial=run.step, desc="finetune", unit="step", file=sys.stderr, leave=False,
               disable=run.rank != 0 or not cfg.progress)
    while run.step < run.total:
        epoch, offset = divmod(run.step, run.per_epoch)
        run.sampler.set_epoch(epoch)
        run.images.epoch = epoch
        order = list(run.sampler)[offset * accum * cfg.batch_size: run.per_epoch * accum * cfg.batch_size]
        loader = torch.utils.data.DataLoader(run.images, batch_size=cfg.batch_size, sampler=order,
                                             collate_fn=ImageDataset.collate, num_workers=cfg.workers)
        batches = iter(loader)
        while run.step < run.total:
            group = [b for _, b in zip(range(accum), batches)]
            if len(group) < accum:
                break
            row = train_one_step(run, group)
            run.rows.append(row)
            bar.set_postfix(loss=row["loss"], agree=row["agreement"], img_s=row["images_per_s"])
            bar.update(1)
            if run.blend_until and run.step >= run.blend_until and blended(run.student):
                _end_of_blend(run, log)
            if val is not None and (run.step % run.per_epoch == 0 or run.step == run.total):
                validation()
            if run.step % cfg.checkpoint_every == 0 or run.step == run.total:
                run.save()
                if run.rank == 0:
                    _write_csv(out / "log.csv", run.rows)
                    if val is not None:
                        _write_csv(out / "val.csv", run.val_rows)
            for hook in list(_step_hooks.values()):
                hook(run.step)
    bar.close()
    summary = {"steps": run.step, "skipped_images": run.skipped, "world_size": run.world,
               "val_top1": float(run.val_rows[-1]["top1"]) if run.val_rows else None}
    if run.rank == 0:
        final = run.ema.module if run.ema is not None else run.student
        if run.ema is not None:
            final.afconvert_info = run.student.afconvert_info
        from afconvert.converter.engine import audit
        from afconvert.sources.checkpoint import save
        set_data_config(final, {**run.dcfg, "input_size": (run.chans, *run.size)})    # what it was trained on
        save(final, out / "final.pt")
        report = audit(final.cpu().eval(), input_size=final.afconvert_info.input_size)
        plotted = _plot(run.rows, run.val_rows, out / "curves.png",
                        "the teacher" if teacher is not None else "the labels")
        summary.update(final=str(out / "final.pt"), verdict=report.verdict_text, stable=report.stable,
                       curves=str(out / "curves.png") if plotted else None)
    if run.world > 1:
        dist.barrier()
    return summary
