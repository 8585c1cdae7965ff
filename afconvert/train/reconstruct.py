"""Block-wise reconstruction: fit each converted block to its source block, in network order.

As post-training quantisation does (AdaRound, BRECQ), before any distillation of the logits: for
each unit k (a block, in forward order) the student's unit is trained to map the input it receives
*in the student* (so it also corrects what earlier units left) to the output of the teacher's unit
on the same image,

    min_theta_k  E || g_k(x_k^student; theta_k) - f_k(x_k^teacher) ||^2 / E || f_k(x_k^teacher) ||^2

where the expectations run over every pixel of every image given. A block's output has C x H x W
targets per image, against 1000 logits: far more signal per image than logit distillation, and
every parameter stays where the block is. Only the weights change, never a layer's class: the
converted network stays exactly alias-free.

Units: the children of every ``nn.Sequential`` / ``nn.ModuleList`` reached from the model through
such containers (and through modules that hold a ``blocks`` container, timm's stages), each with
parameters of its own: timm's ``blocks.i.j``, ResNet's ``layerN.i``, ConvNeXt's ``stages.i.blocks.j``.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["reconstruction_units", "reconstruct"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


class _Stop(Exception):  # noqa: N818 (control flow, not an error)
    """Raised by a hook once the unit's input is captured: the rest of the forward is not needed."""


def _descend(module: nn.Module) -> bool:
    return isinstance(module, _CONTAINERS) or isinstance(getattr(module, "blocks", None), _CONTAINERS)


def reconstruction_units(model: nn.Module) -> list[str]:
    """Names of the units to reconstruct, in registration (for these models: forward) order."""
    units: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if _descend(child):
                walk(child, path + ".")
            elif any(p.requires_grad for p in child.parameters()):
                units.append(path)
    walk(model, "")
    return units


@torch.no_grad()
def _capture(model: nn.Module, name: str, batches: Sequence[torch.Tensor], what: str) -> list:
    """Per batch, the positional inputs of unit ``name`` (``what="input"``, a tuple; the forward stops
    there) or its output."""
    unit, seen = model.get_submodule(name), []

    def hook(mod, args, out=None):
        if what == "input":
            seen.append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))
            raise _Stop
        if not torch.is_tensor(out):
            raise _NotABlock(f"unit '{name}' returns {type(out).__name__}, not a tensor")
        seen.append(out.detach().clone())
    handle = unit.register_forward_pre_hook(hook) if what == "input" else unit.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise _NotABlock(f"unit '{name}' is called {len(seen)} times for {len(batches)} batches")
    return seen


class _NotABlock(RuntimeError):
    """A unit whose input or output cannot be matched one to one (called several times, not a tensor)."""


def reconstruct(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], steps: int = 100,
                lr: float = 1e-3, units: Sequence[str] | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
    """Reconstruct ``student`` (trained in place) unit by unit against ``teacher`` on ``batches`` (each
    (B, C, H, W), already on the models' device): ``steps`` Adam steps per unit, one batch per step, in
    turn. The student runs in eval mode throughout: BatchNorm statistics stay, no stochastic depth. Returns per unit {"unit", "before", "after", "kept"}: the
    relative squared error over all batches before and after its fit (a unit that the fit would leave
    worse keeps its weights: ``kept``)."""
    units = list(units) if units is not None else [u for u in reconstruction_units(student)
                                                   if u in dict(teacher.named_modules())]
    teacher.eval()
    was_training = student.training
    rows = []
    try:
        for name in units:
            t0 = time.perf_counter()
            student.eval()
            try:
                inputs = _capture(student, name, batches, "input")
                targets = _capture(teacher, name, batches, "output")
            except _NotABlock as exc:
                log(f"reconstruct {name}: skipped ({exc})")
                continue
            unit = student.get_submodule(name)
            with torch.no_grad():
                shape = tuple(unit(*inputs[0]).shape)
            if shape != tuple(targets[0].shape):     # e.g. a down-sampling the recipe moved to a later layer
                log(f"reconstruct {name}: skipped (output {shape}, its source's {tuple(targets[0].shape)})")
                continue
            params = [p for p in unit.parameters() if p.requires_grad]
            energy = [t.float().square().mean().clamp_min(1e-12) for t in targets]

            def error() -> float:
                with torch.no_grad():
                    return sum(float((unit(*x) - t).float().square().mean() / e)
                               for x, t, e in zip(inputs, targets, energy)) / len(inputs)
            before = error()
            saved = {k: v.clone() for k, v in unit.state_dict().items()}
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
            for i in range(steps):
                j = i % len(inputs)
                loss = (unit(*inputs[j]) - targets[j]).float().square().mean() / energy[j]
                if not torch.isfinite(loss):
                    continue  # an overflowing batch: leave it out rather than poison the weights
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            after = error()
            kept = not after <= before       # never leave a unit worse than it was (or non-finite)
            if kept:
                unit.load_state_dict(saved)
            rows.append({"unit": name, "before": before, "after": before if kept else after, "kept": kept})
            log(f"reconstruct {name}: relative error {before:.3g} -> " + (f"{after:.3g}, worse: kept as it was" if kept
                else f"{after:.3g}") + f" ({time.perf_counter() - t0:.1f} s)")
    finally:
        student.train(was_training)
    return rows

