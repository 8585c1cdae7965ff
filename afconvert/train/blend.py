"""Progressive replacement: each replaced layer as a blend of its source and its alias-free form, annealed.

A blended layer computes y = lambda * source(x) + (1 - lambda) * aliasfree(x), for every module the converter
replaced (a module path whose class differs between the converted model and its source). At lambda = 1 for
all layers the network is the source network (functional calls the converter rewrote excepted: they are
alias-free from the start); at lambda = 0 it is exactly the converted one, and ``unblend`` puts the alias-free
modules back in place, so the final network has the converted classes and its certificate. While some
lambda > 0 the network is *not* alias-free: the source layers alias.

Schedules over the blend phase's progress p in [0, 1]: ``"all"``, lambda = 1 - p for every layer; and
``"progressive"`` (front to back, as SMART-PAF replaces activations layer by layer), layer i of n in
forward order anneals during [i / n, (i + 1) / n] of the phase.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.layers.conv import AliasFreeConv2d
from afconvert.layers.poly import AliasFreePolyActivation
from afconvert.layers.sampling import subsample
from afconvert.train.config import BLEND_ORDERS

__all__ = ["Blend", "blend", "unblend", "blended", "set_blend", "blend_weights", "BLEND_ORDERS"]


class Blend(nn.Module):
    """lambda * source(x) + (1 - lambda) * aliasfree(x), lambda a buffer in [0, 1]; the source is frozen."""

    def __init__(self, source: nn.Module, aliasfree: nn.Module):
        super().__init__()
        self.source = copy.deepcopy(source).requires_grad_(False)
        for m in self.source.modules():      # the alias-free branch reads the same input
            if hasattr(m, "inplace"):
                m.inplace = False
        self.aliasfree = aliasfree
        self.register_buffer("lam", torch.ones(()))

    def forward(self, *args, **kwargs):
        lam = self.lam
        return lam * self.source(*args, **kwargs) + (1 - lam) * self.aliasfree(*args, **kwargs)


class _FullRateConv(nn.Module):
    """A strided source conv at stride 1, with its own padding on the left (``pad`` = (left, right, top, bottom)):
    its samples at multiples of the stride are the strided conv's. The source branch of a conv whose down-sampling
    the converter deferred (``defer``)."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__()
        self.conv, self.pad = conv, tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.conv2d(F.pad(x, self.pad, mode=mode), conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)


class _SampledAfter(nn.Module):
    """The source activation, then the source's sampling (every s-th sample) that the converter moved after it."""

    def __init__(self, act: nn.Module, down: nn.Module):
        super().__init__()
        self.act, self.down = act, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        return subsample(y, self.down.down, self.down.output_size(*y.shape[-2:]))


def _source_in_place(source: nn.Module, aliasfree: nn.Module) -> nn.Module:
    """The source layer as it runs in the alias-free layer's place: where the converter deferred a strided conv's
    down-sampling past the activation (``defer``), the conv runs at stride 1 and the activation samples after
    itself, so the blend at lambda = 1 is still exactly the source network."""
    if isinstance(aliasfree, AliasFreeConv2d) and aliasfree.down == (1, 1) and tuple(source.stride) != (1, 1):
        return _FullRateConv(source, aliasfree.pad)
    if isinstance(aliasfree, AliasFreePolyActivation) and "post_down" in aliasfree._modules:
        return _SampledAfter(source, aliasfree.post_down)
    return source


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def blend(student: nn.Module, source: nn.Module) -> list[str]:
    """Wrap, in place, every module of ``student`` whose class differs from ``source``'s module at the same
    path in a ``Blend`` (lambda = 1); returns their paths in forward (registration) order."""
    theirs = dict(source.named_modules())
    paths: list[str] = []
    for path, module in list(student.named_modules()):
        if not path or any(path.startswith(p + ".") for p in paths):
            continue
        other = theirs.get(path)
        if other is not None and type(other) is not type(module) and not isinstance(module, Blend):
            paths.append(path)
    for path in paths:
        new = student.get_submodule(path)
        _set(student, path, Blend(_source_in_place(theirs[path], new), new))
    return paths


def blended(model: nn.Module) -> list[Blend]:
    return [m for m in model.modules() if isinstance(m, Blend)]


def unblend(model: nn.Module) -> int:
    """Put every blended layer's alias-free module back in its place; returns how many there were."""
    paths = [p for p, m in model.named_modules() if isinstance(m, Blend)]
    for path in paths:
        _set(model, path, model.get_submodule(path).aliasfree)
    return len(paths)


def blend_weights(progress: float, n: int, order: str = "all") -> list[float]:
    """lambda of each of ``n`` blended layers (forward order) at ``progress`` in [0, 1] of the blend phase."""
    if order not in BLEND_ORDERS:
        raise ValueError(f"blend order '{order}': unknown; fix: one of {', '.join(BLEND_ORDERS)}")
    p = min(max(float(progress), 0.0), 1.0)
    if order == "all":
        return [1.0 - p] * n
    return [min(1.0, max(0.0, 1.0 - (p * n - i))) for i in range(n)]


def set_blend(model: nn.Module, progress: float, order: str = "all") -> float:
    """Set every blended layer's lambda for ``progress``; returns their mean."""
    layers = blended(model)
    weights = blend_weights(progress, len(layers), order)
    for m, lam in zip(layers, weights):
        m.lam.fill_(lam)
    return sum(weights) / len(weights) if weights else 0.0
