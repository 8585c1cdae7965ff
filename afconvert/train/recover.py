"""Recovery from unlabelled images: a converted model's features matched to its source's on the user's domain.

Converted, ImageNet weights are worth less than random ones (a linear probe of EfficientNet-Lite0's features on
Fashion-MNIST: 85.5 % original, 62.3 % converted, 69 % random init): every replaced layer is a slightly
different function, and the differences compound with depth. Recovery needs data, and the data a user always
has is unlabelled images of their own domain. ``recover`` fits the converted model (the student) to the
source (the teacher) on them, block by block (``reconstruct``: each block maps the input it receives in the
student to the teacher block's output), then end to end (``distill``: the pre-logit features, each scaled by
the teacher's spread of it, and the logits at a temperature), re-parametrises its BatchNorms to the statistics
of their inputs on the images (``match_batchnorm_statistics``: the same function, fitted in eval mode, then
also in training mode, so fine-tuning starts from it), and measures fidelity on images of the same folder
it did not fit on: the cosine of the pre-logit features and the top-1 agreement of the logits. Only weights
change, never a layer's class: the result stays exactly alias-free. What each phase buys, measured on
Fashion-MNIST with EfficientNet-Lite0's ImageNet weights: docs/results.md.

A run writes its state after every block (``OUT.partial``, atomically): started again with the same output it
resumes after the last finished block (a run stopped in the end-to-end phase starts that phase again).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.atomic import atomic_torch_save
from afconvert.converter.calibrate import match_batchnorm_statistics
from afconvert.train.reconstruct import reconstruct, reconstruction_units

__all__ = ["RecoverConfig", "RecoverError", "recover", "fidelity", "pre_logits", "matched_units"]


class RecoverError(ValueError):
    """The student and the teacher cannot be matched block by block, or the state file does not fit."""


@dataclass
class RecoverConfig:
    """The settings of a recovery (``afconvert recover``'s flags)."""

    steps: int = 60                 # Adam steps per block, one batch each
    lr: float = 1e-3                # per block, cosine-annealed over its steps
    batch_size: int = 32
    reconstruct_images: int = 512   # of the images, those the blocks are fitted on (the end-to-end phase sees all)
    distill_steps: int = 150        # then end to end: AdamW steps on the pre-logit features and the logits (0: none)
    distill_lr: float = 2e-4        # 5 % warm-up, then cosine
    distill_temperature: float = 2.0
    freeze: int = 4                 # the first blocks, already close, stay as reconstructed in the end-to-end phase
    seed: int = 0


def _classifier(model: nn.Module) -> nn.Module:
    """The layer that makes the logits: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RecoverError(f"{type(model).__name__} has no classifier layer (nn.Linear) to read features before; fix: "
                           f"recover a classification model")
    return linears[-1]


class _Features:
    """Keeps the classifier's input of each forward (differentiable)."""

    def __init__(self, model: nn.Module):
        self.seen: list[torch.Tensor] = []
        self.handle = _classifier(model).register_forward_pre_hook(lambda mod, args: self.seen.append(args[0]))

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.clear()
        logits = model(x)
        return self.seen[-1].flatten(1), logits


@torch.no_grad()
def pre_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logit features (N, D): the classifier's input, flattened; logits (N, K)) of ``model`` in eval mode."""
    grab, was = _Features(model), model.training
    model.eval()
    try:
        feats, logits = zip(*(grab(model, batch) for batch in torch.split(images, batch_size)))
    finally:
        grab.handle.remove()
        model.train(was)
    return torch.cat(feats).float(), torch.cat(logits).float()


def fidelity(student: nn.Module, teacher: nn.Module, images: torch.Tensor, batch_size: int = 64,
             reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """How close ``student`` is to ``teacher`` on ``images``: {"cosine": mean cosine of their pre-logit features,
    "agreement": fraction of images with the same top-1 class}. ``reference``: the teacher's ``pre_logits``."""
    tf, tl = reference if reference is not None else pre_logits(teacher, images, batch_size)
    sf, sl = pre_logits(student, images, batch_size)
    cos = torch.nn.functional.cosine_similarity(sf, tf, dim=1)
    return {"cosine": float(cos.mean()), "agreement": float((sl.argmax(1) == tl.argmax(1)).float().mean())}


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: RecoverConfig, units: Sequence[str],
            log: Callable[[str], None] = print) -> list[float]:
    """End-to-end fit of ``student`` (in place, BatchNorm statistics kept) to ``teacher`` on ``images``:
    mean over features of ((f_s - f_t) / sigma_t)^2 (sigma_t: the teacher's spread of each pre-logit feature,
    at least a tenth of their mean) + T^2 KL(softmax(z_t / T) || softmax(z_s / T)), AdamW, 5 % warm-up then
    cosine, gradients clipped at 5. The first ``cfg.freeze`` of ``units`` are not trained. Returns the losses."""
    tf, tl = pre_logits(teacher, images, cfg.batch_size)
    sigma = tf.std(0)
    sigma = sigma.clamp_min(0.1 * float(sigma.mean()))
    frozen = {id(p) for u in units[:cfg.freeze] for p in student.get_submodule(u).parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    opt = torch.optim.AdamW(params, lr=cfg.distill_lr, weight_decay=0.0)
    warm = max(1, cfg.distill_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / warm if k < warm else
                                              0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, cfg.distill_steps - warm))))
    grab, t = _Features(student), cfg.distill_temperature
    g = torch.Generator().manual_seed(cfg.seed + 1)
    was, losses, t0 = student.training, [], time.perf_counter()
    student.eval()
    try:
        for step in range(cfg.distill_steps):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
            sf, sl = grab(student, images[idx])
            kl = F.kl_div(F.log_softmax(sl.float() / t, 1), F.log_softmax(tl[idx] / t, 1), reduction="batchmean",
                          log_target=True)
            loss = ((sf.float() - tf[idx]) / sigma).square().mean() + t * t * kl
            if not torch.isfinite(loss):
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 25 == 0 or step + 1 == cfg.distill_steps:
                log(f"distill step {step + 1}/{cfg.distill_steps}: loss {losses[-1]:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)")
    finally:
        grab.handle.remove()
        student.train(was)
    return losses


def matched_units(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The student's reconstruction units that the teacher has under the same name (its blocks, in forward
    order); refuses a pair with none in common."""
    theirs = dict(teacher.named_modules())
    units = [u for u in reconstruction_units(student) if u in theirs]
    if not units:
        raise RecoverError(f"no block of the converted {type(student).__name__} matches a block of the source "
                           f"{type(teacher).__name__} by name; fix: recover a model converted from that source (its "
                           f"checkpoint, or the model's name)")
    return units


def _read_state(path: Path, units: list[str], student: nn.Module) -> list[str]:
    """The units a previous run finished (its state loaded into ``student``), or [] without a state file."""
    if not path.is_file():
        return []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["state_dict"], strict=True)
    except Exception as exc:
        raise RecoverError(f"{path}: not a recovery state of this model ({type(exc).__name__}); fix: delete it to "
                           f"start over") from exc
    done = list(state["done"])
    if done != units[:len(done)]:
        raise RecoverError(f"{path}: its finished blocks are not this model's; fix: delete it to start over")
    return done


def recover(student: nn.Module, teacher: nn.Module, images: torch.Tensor, held_out: torch.Tensor,
            cfg: RecoverConfig, state: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Fit ``student`` (in place) to ``teacher`` on the unlabelled ``images`` (N, C, H, W), block by block;
    then end to end (``distill``); measure ``fidelity`` on ``held_out`` before and after. ``state``: where to
    keep the progress after each block (resumed from when present; removed at the end). Returns {"before",
    "after", "blocks" (per block: relative error before and after), "seconds"}."""
    t0 = time.perf_counter()
    units = matched_units(student, teacher)
    reference = pre_logits(teacher, held_out, cfg.batch_size)
    before = fidelity(student, teacher, held_out, cfg.batch_size, reference)
    log(f"fidelity before, on {len(held_out)} held-out images: feature cosine {before['cosine']:.3f}, top-1 "
        f"agreement {before['agreement']:.3f}")
    state = Path(state) if state is not None else None
    done = _read_state(state, units, student) if state is not None else []
    if done:
        log(f"resuming after {len(done)} of {len(units)} blocks ({state})")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    batches = list(torch.split(images[order[:cfg.reconstruct_images]], cfg.batch_size))
    rows = []
    for unit in units[len(done):]:
        rows += reconstruct(student, teacher, batches, steps=cfg.steps, lr=cfg.lr, units=[unit], log=log)
        done.append(unit)
        if state is not None:
            atomic_torch_save(state, {"done": done, "state_dict": student.state_dict(), "config": asdict(cfg)})
    if cfg.distill_steps:   # not checkpointed: a run killed here resumes from the last block
        distill(student, teacher, images, cfg, units, log)
    matched = match_batchnorm_statistics(student, torch.split(images, cfg.batch_size))
    if matched:
        log(f"{matched} BatchNorm layers given the statistics of their inputs on the images (same function in eval "
            f"mode; training mode now agrees with it)")
    after = fidelity(student, teacher, held_out, cfg.batch_size, reference)
    log(f"fidelity after: feature cosine {after['cosine']:.3f}, top-1 agreement {after['agreement']:.3f}")
    if state is not None:
        state.unlink(missing_ok=True)
    return {"before": before, "after": after, "blocks": rows, "seconds": time.perf_counter() - t0}


def split_held_out(images: torch.Tensor, held_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images to fit on, ``held_out`` images kept for measuring), a fixed random split."""
    if len(images) < held_out + 1:
        raise RecoverError(f"{len(images)} readable images: too few to fit on and keep {held_out} for measuring; fix: "
                           f"give more images, or fewer --held-out")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[held_out:]], images[order[:held_out]]
