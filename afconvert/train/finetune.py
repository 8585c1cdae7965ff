"""Fine-tuning a converted model by distillation from its source model, timm-style, on one CPU or many
GPUs (``torchrun``: ``torch.distributed`` DDP, NCCL on GPUs and gloo on CPUs, a ``DistributedSampler``);
without a teacher, the same loop trains from the labels alone (``afconvert train``: cross-entropy).

* Data: every image under ``--data`` (class folders give labels for the optional task loss; unlabeled
  folders work), timm's training transform (random resized crop, flip, RandAugment) at the student's
  mean/std. Each sample's augmentation is seeded by (seed, epoch, index): a run is reproducible
  whatever the number of workers, and a resumed run sees exactly the images the killed one would have.
* Optional block-wise reconstruction first (``--reconstruct``, ``afconvert.train.reconstruct``): each
  block fitted to its source block's output on the training images, in network order.
* Loss: ``kd_loss`` (KL at ``--kd-temperature``, non-finite rows left out) plus, with
  ``--task-loss-weight``, cross-entropy on the folder labels; without a teacher, that cross-entropy alone.
  timm's ``create_optimizer_v2``, ``create_scheduler_v2`` (stepped per update), ``ModelEmaV3`` and ``Mixup``
  (``--mixup`` / ``--cutmix``: teacher and student see the same mixed images). BatchNorm statistics stay frozen
  (few images per batch) unless ``--train-bn``. ``--grad-accum-steps N``: one update per N batches.
* Mixed precision (``--amp``, ``--amp-dtype``): torch autocast; the FFT, polynomial and LayerNorm
  layers compute in float32 inside it (``promote_half``); float16 uses a ``GradScaler``.
* Checkpoints: ``OUTPUT/last.pt`` every ``--checkpoint-every`` steps, written atomically, holding the
  model, optimizer, scheduler, EMA, grad scaler, step and every rank's RNG (the first one as soon as
  the run starts, the next after reconstruction); ``--resume`` continues from it and loses at most
  the steps since. Under ``torchrun --max-restarts N`` the restarted workers of the same launch resume
  from it by themselves (the checkpoint names its launch: rank 0's host, launcher pid and rendezvous
  id; another launch's run in ``--output`` is still refused). ``OUTPUT/teacher.pt`` (the teacher's
  weights, the same on every process and after a resume), ``OUTPUT/log.csv`` (one row per step),
  ``OUTPUT/curves.png`` (loss and agreement with the teacher, or with the labels), ``OUTPUT/final.pt`` (an
  afconvert checkpoint: ``afconvert.load``, with the data config it was trained at).
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
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from afconvert.atomic import atomic_write
from afconvert.data import (
    DataError,
    ImageDataset,
    data_config,
    image_mode,
    set_data_config,
    training_samples,
)
from afconvert.train.distill import agreement, kd_loss

__all__ = ["FinetuneConfig", "FinetuneError", "finetune", "TRAIN_FORMAT"]

TRAIN_FORMAT = "afconvert-train/1"
KILL_ENV = "AFCONVERT_TEST_KILL_AFTER_STEP"   # tests: exit abruptly after this step, as a killed run would


class FinetuneError(DataError):
    """A fine-tuning input that cannot work; the message names the fix."""


@dataclass
class FinetuneConfig:
    data: str
    output: str
    split: str = "train"                # the split of an IDX --data folder
    epochs: int = 10
    steps: int | None = None            # total optimizer steps (overrides epochs)
    batch_size: int = 16                # per process
    input_size: tuple[int, int] | None = None  # default: the student's data config
    scale: tuple[float, float] = (0.08, 1.0)    # random-resized-crop area range
    opt: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    sched: str = "cosine"
    warmup_epochs: int = 0
    kd_temperature: float = 1.0
    task_loss_weight: float = 0.0
    clip_grad: float | None = None
    grad_accum_steps: int = 1           # batches per optimizer update
    amp: bool = False                   # autocast (FFT / polynomial / LayerNorm layers stay float32)
    amp_dtype: str = "float16"          # or bfloat16
    mixup: float = 0.0                  # timm Mixup alpha (0: off)
    cutmix: float = 0.0                 # timm CutMix alpha (0: off)
    reconstruct: bool = False           # block-wise reconstruction before distillation
    reconstruct_steps: int = 100        # Adam steps per block
    reconstruct_batches: int = 4        # batches of training crops it fits on
    reconstruct_lr: float = 1e-3
    model_ema: bool = False
    model_ema_decay: float = 0.999
    train_bn: bool = False
    auto_augment: str | None = "rand-m9-mstd0.5"
    checkpoint_every: int = 50
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True


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
        torch.manual_seed(s)
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
        store = dist.PrefixStore(f"afconvert/attempt_{_restart_count()}", store)
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


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


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
        atomic_write(path, lambda fh: torch.save(state, fh))


def _read_state(path: Path) -> dict:
    from afconvert.sources.models import load_error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FinetuneError(f"--resume: cannot read {path}: {load_error(exc)}; fix: start a new run in another "
                            f"--output") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        raise FinetuneError(f"--resume: {path} is not an afconvert fine-tuning checkpoint; fix: point --output at "
                            f"the folder of the run to resume")
    return state


def _restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this launch's workers; 0 outside it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _launch_id(world: int) -> str:
    """Names this launch, the same in each restart of its workers and different for another launch: rank
    0's host, its launcher's pid (torchrun's agent is the workers' parent) and the rendezvous id."""
    launch = [f"{socket.gethostname()}:{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"]
    if world > 1:
        dist.broadcast_object_list(launch, src=0)
    return launch[0]


def _resume_state(out: Path, resume: bool, launch: str = "") -> dict | None:
    """The state of the checkpoint to resume from (``out/last.pt``), or None; refuse to overwrite another
    run. A restarted worker (``_restart_count() > 0``) resumes its own launch's checkpoint without
    ``--resume``."""
    last = out / "last.pt"
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output {out} is a file; fix: give a folder")
    if resume:
        if not last.is_file():
            raise FinetuneError(f"--resume: no checkpoint {last}; fix: drop --resume to start a new run")
        return _read_state(last)
    if _restart_count() and last.is_file():
        state = _read_state(last)
        if state.get("launch") == launch:
            return state
    if out.is_dir() and any((out / n).exists() for n in ("last.pt", "log.csv", "final.pt", "teacher.pt")):
        raise FinetuneError(f"--output {out} holds another run; fix: --resume to continue it, or choose another "
                            f"--output")
    return None


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _plot(rows: list[dict], path: Path, versus: str = "the teacher") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [float(r["loss"]) for r in rows])
    a.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    b.plot(steps, [100 * float(r["agreement"]) for r in rows])
    b.set(xlabel="step", ylabel=f"top-1 agreement with {versus} (%)", ylim=(-2, 102), title="agreement (batch)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


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


def finetune(student: nn.Module, teacher: nn.Module | None, cfg: FinetuneConfig, log=print) -> dict:
    """Distil ``teacher`` into the converted ``student`` (trained in place) as ``cfg`` says, or, with no teacher,
    train it from the data's labels; returns a summary {"steps", "final", "verdict", ...}. Rank 0 writes every
    output."""
    rank, world, device = _distributed(cfg.device)
    out = Path(cfg.output)
    launch = _launch_id(world)
    state = _resume_state(out, cfg.resume, launch)
    samples, folders = training_samples(cfg.data, split=cfg.split)
    from timm.data import Mixup, create_transform
    dcfg = data_config(student)
    size = tuple(cfg.input_size or dcfg["input_size"][1:])
    chans = dcfg["input_size"][0]
    transform = create_transform(input_size=(chans, *size), is_training=True, auto_augment=cfg.auto_augment,
                                 scale=tuple(cfg.scale),
                                 mean=dcfg["mean"], std=dcfg["std"], interpolation=dcfg["interpolation"])
    images = _SeededImages(ImageDataset(samples, transform, image_mode(dcfg)), cfg.seed)
    sampler = torch.utils.data.DistributedSampler(images, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    accum = max(1, int(cfg.grad_accum_steps))
    per_epoch = len(sampler) // (cfg.batch_size * accum)          # optimizer updates per epoch
    if per_epoch == 0:
        raise FinetuneError(f"{len(samples)} images for batches of {cfg.batch_size} x {accum} accumulation step(s) "
                            f"on {world} process(es); fix: a smaller --batch-size or --grad-accum-steps, or more "
                            f"images")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise FinetuneError(f"--mixup / --cutmix need an even --batch-size, got {cfg.batch_size}; fix: an even one")
    total = cfg.steps or cfg.epochs * per_epoch

    student.to(device)
    if teacher is None and (not folders or any(c < 0 for _, c in samples)):
        raise FinetuneError(f"training from labels needs labelled images, and {cfg.data} has none; fix: class "
                            f"folders (DIR/<class>/<image>) or an IDX folder")
    if teacher is None and cfg.reconstruct:
        raise FinetuneError("--reconstruct fits blocks to a teacher's, and this run has none; fix: drop it")
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
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
    autocast, scaler = _amp(cfg, device)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=k_s) \
        if cfg.mixup or cfg.cutmix else None

    if state is not None and state["world_size"] != world:
        raise FinetuneError(f"--resume: the run used {state['world_size']} process(es), this one {world}; fix: "
                            f"resume with --nproc_per_node={state['world_size']}")
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
    step, rows, reconstructed = 0, [], False
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        reconstructed = bool(state.get("reconstructed"))
        _set_rng_state(state["rng"][rank])
        if (out / "log.csv").is_file():
            with open(out / "log.csv", newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        restarted = f" (torchrun restart {_restart_count()})" if not cfg.resume else ""
        log(f"resumed {out / 'last.pt'} at step {step}{restarted}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if rows:
            _write_csv(out / "log.csv", rows)

    def save_checkpoint() -> None:
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if rank == 0:
            state = {"format": TRAIN_FORMAT, "step": step, "world_size": world, "launch": launch,
                     "config": asdict(cfg), "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "reconstructed": reconstructed, "rng": rng}
            atomic_write(out / "last.pt", lambda fh: torch.save(state, fh))

    if state is None:
        save_checkpoint()       # a run killed from here on resumes with --resume
    if cfg.reconstruct and not reconstructed and step == 0:
        if rank == 0:
            from afconvert.train.reconstruct import reconstruct
            batches = _reconstruction_batches(images, cfg, device)
            reconstruct(student, teacher, batches, steps=cfg.reconstruct_steps, lr=cfg.reconstruct_lr, log=log)
        if world > 1:           # every process starts distillation from rank 0's reconstructed weights
            for t in student.state_dict().values():
                dist.broadcast(t, src=0)
        if ema is not None:
            ema = ModelEmaV3(student, decay=cfg.model_ema_decay)
        reconstructed = True
        save_checkpoint()
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", file=sys.stderr, leave=False,
               disable=rank != 0 or not cfg.progress)
    skipped_total, kill_at = 0, int(os.environ.get(KILL_ENV, "0")) if not _restart_count() else 0
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        images.epoch = epoch
        order = list(sampler)[offset * accum * cfg.batch_size: per_epoch * accum * cfg.batch_size]
        loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size, sampler=order,
                                             collate_fn=ImageDataset.collate, num_workers=cfg.workers)
        batches = iter(loader)
        while step < total:
            group = [b for _, b in zip(range(accum), batches)]
            if len(group) < accum:
                break
            t0 = time.perf_counter()
            model.train()
            if not cfg.train_bn:
                _freeze_bn(student)
            optimizer.zero_grad(set_to_none=True)
            losses, agrees, seen = [], [], 0
            for i, (x, y, skipped) in enumerate(group):
                skipped_total += skipped
                if x is None:
                    x, y = torch.zeros(0, chans, *size), torch.zeros(0, dtype=torch.long)
                x, y = x.to(device), y.to(device)
                soft = None
                if mixup is not None and len(x) % 2 == 0 and len(x):
                    x, soft = mixup(x, y.clamp_min(0))
                sync = world == 1 or i == accum - 1
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast():
                        with torch.no_grad():
                            t = teacher(x).float() if teacher is not None else F.one_hot(y.clamp_min(0), k_s)
                        s = model(x)
                    s = s.float()
                    loss = kd_loss(s, t, cfg.kd_temperature)[0] if teacher is not None else None
                    if loss is None:
                        loss = s.sum() * 0.0          # no finite row: a zero step (every rank still takes part)
                    weight = cfg.task_loss_weight if teacher is not None else 1.0
                    if weight and len(y) and (y >= 0).all():
                        ok = torch.isfinite(s).all(1)
                        if ok.any():
                            target = soft if soft is not None else F.one_hot(y, k_s).float()
                            task = -(target[ok] * F.log_softmax(s[ok], 1)).sum(1).mean()
                            loss = loss + weight * task
                    scaler.scale(loss / accum).backward()
                losses.append(float(loss.detach()))
                agrees.append(agreement(s.detach(), t).float().mean().item() if len(x) else 0.0)
                seen += len(x)
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(student, step=step)
            mean_loss, mean_agree = _all_mean([sum(losses) / accum, sum(agrees) / accum], world, device)
            rate = seen * world / max(time.perf_counter() - t0, 1e-9)
            rows.append({"step": step, "epoch": epoch, "loss": f"{mean_loss:.6g}", "agreement": f"{mean_agree:.4f}",
                         "lr": f"{optimizer.param_groups[0]['lr']:.6g}", "images_per_s": f"{rate:.1f}"})
            bar.set_postfix(loss=f"{mean_loss:.3g}", agree=f"{mean_agree:.2f}", img_s=f"{rate:.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == total:
                save_checkpoint()
                if rank == 0:
                    _write_csv(out / "log.csv", rows)
            if kill_at and step == kill_at:
                os._exit(17)  # a kill, as far as this run can tell: nothing after this step is saved
    bar.close()
    summary = {"steps": step, "skipped_images": skipped_total, "world_size": world}
    if rank == 0:
        final = ema.module if ema is not None else student
        if ema is not None:
            final.afconvert_info = student.afconvert_info
        from afconvert.converter.engine import audit
        from afconvert.sources.checkpoint import save
        set_data_config(final, {**dcfg, "input_size": (chans, *size)})    # what it was trained on
        save(final, out / "final.pt")
        report = audit(final.cpu().eval(), input_size=final.afconvert_info["input_size"])
        plotted = _plot(rows, out / "curves.png", "the teacher" if teacher is not None else "the labels")
        summary.update(final=str(out / "final.pt"), verdict=report.verdict_text, stable=report.stable,
                       curves=str(out / "curves.png") if plotted else None)
    if world > 1:
        dist.barrier()
    return summary
