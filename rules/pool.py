"""Pooling.

* A stride-s average pool is a box filter then sub-sampling: it aliases everything above N/(2s)
  that the box filter lets through. Alias-free: the box filter as a stride-1 circular filter, then
  ideal down-sampling (exact).
* A stride-s max pool aliases twice: the max creates harmonics, the stride folds them.
  ``pool.max = "ideal"`` (default, exact): ideal down-sampling alone, the max dropped.
  ``pool.max = "max"`` (approximate): a stride-1 circular max, then ideal down-sampling; the
  max's harmonics above the new band are removed, those it folds inside are not.
* A stride-1 max pool is a pointwise-in-windows nonlinearity: not alias-free (kept, reported).
* An adaptive pool is judged by its output size. To 1 x 1 (global): an average keeps the DC bin only
  (exact), a max is invariant to integer shifts only. To a larger grid: a box filter (or max) sampled
  at a fractional stride H / h, so the grid moves with the input by a fraction of a cell: not
  alias-free. Before a flatten and a Linear (VGG's and AlexNet's heads) ``pool.head = "global"``
  replaces an average one by the global average broadcast to the grid (``BroadcastGlobalPool2d``):
  exact, equal to the head with its weight summed over the grid's positions (a different function
  where the pooled map is not spatially constant).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

from afconvert.converter import rule
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.pool import AliasFreePool2d, BroadcastGlobalPool2d, SampledPool2d
from afconvert.layers.sampling import BlurPool2d, PolyphasePool2d, SubsampledPool2d

FAMILY = "pool"


@dataclass(frozen=True)
class Options(rule.Options):
    """[pool]"""

    replace: str = "ideal"          # strided pools: "ideal" (alias-free), "blur" (BlurPool), "aps" (adaptive polyphase
                                    # sampling), "circular" (circular map, stride kept); "keep"
    max: str = field(default="ideal", metadata={"choices": ("ideal", "max")})  # "ideal": a strided max pool is the
                                    # ideal down-sampling alone (exact); "max": circular max first (approximate)
    blur_size: int = 3              # "blur": width of the binomial filter
    head: str = field(default="keep", metadata={"choices": ("keep", "global")})  # an adaptive average pool to a
                                    # grid > 1 x 1 before a flatten (VGG's head): "global": the global average at
                                    # every cell of the grid (exact; the Linear after it sums its weight over them)


POOLS = (nn.MaxPool2d, nn.AvgPool2d, MaxPool2dSame, AvgPool2dSame)
# functional forms and their parameters, in order (they have no introspectable signature)
FUNCTIONAL = {F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                            "return_indices")),
              F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                            "divisor_override"))}


def _pool_of(site: Site) -> nn.Module | None:
    """The pool module of a site: its own, or one built from a functional call's constant arguments."""
    if site.module is not None:
        return site.module
    cls, names = FUNCTIONAL[site.node.target]
    params = site.call_args(names)
    if params is None or params.get("return_indices"):
        return None
    return cls(**params)


def _stride(pool) -> tuple[int, int]:
    s = pool.stride if pool.stride is not None else pool.kernel_size
    return (s, s) if isinstance(s, int) else tuple(s)


def _judge_pool(site: Site, options: Options) -> Judgement:
    pool = _pool_of(site)
    if pool is None:
        return Judgement(Verdict.NOT, "pooling with computed arguments or indices: not converted")
    peer = rule.judge_sampler(pool, pool.stride, site.x)
    if peer is not None:
        return peer
    if isinstance(pool, AliasFreePool2d):
        if pool.mode == "max":
            return Judgement(Verdict.APPROX, "stride-1 circular max before ideal down-sampling: the max's own "
                                             "harmonics inside the band still alias")
        return Judgement(Verdict.EXACT, f"{'circular box filter + ' if pool.mode == 'avg' else ''}ideal "
                                        f"down-sampling by {pool.stride}")
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    kind = "max" if isinstance(pool, (nn.MaxPool2d, MaxPool2dSame)) else "average"
    if _stride(pool) == (1, 1):
        if kind == "average":
            return Judgement(Verdict.NOT, "zero-padded stride-1 average pool: not circular")
        return Judgement(Verdict.NOT, "stride-1 max pool: a nonlinearity at the input rate")
    return Judgement(Verdict.NOT, f"stride-{_stride(pool)[0]} {kind} pooling sub-samples below Nyquist")


def _sampled(cls: type[SampledPool2d]):
    """The strategy: a strided pool as its local operator at stride 1 on the circular map, then ``cls``'s
    sampler (for ``ideal`` a max pool is the ideal down-sampling alone unless ``max = "max"``)."""
    def strategy(site: Site, options: Options):
        pool = _pool_of(site)
        if pool is None or isinstance(pool, SampledPool2d) or not site.spatial or site.x is None \
                or site.x.spatial_dims != (2, 3):
            return None
        same = isinstance(pool, (MaxPool2dSame, AvgPool2dSame))
        if isinstance(pool, (nn.MaxPool2d, MaxPool2dSame)):
            if _stride(pool) == (1, 1):
                return None  # no alias-free max at the same rate: reported as is
            mode = options.max if cls is AliasFreePool2d else "max"
        else:
            mode = "avg"
        new = cls.from_pool(pool, mode, same)
        if cls is BlurPool2d:
            new.filt_size = options.blur_size
        return new
    return strategy


ADAPTIVE = {nn.AdaptiveAvgPool2d: "average", F.adaptive_avg_pool2d: "average", nn.AdaptiveMaxPool2d: "max",
            F.adaptive_max_pool2d: "max"}
FLATTENS = ("flatten", "view", "reshape", torch.flatten, torch.reshape, nn.Flatten)


def _adaptive_kind(site: Site) -> str:
    return ADAPTIVE[type(site.module) if site.module is not None else site.node.target]


def _adaptive_size(site: Site) -> tuple | None:
    """The output size (h, w) an adaptive pool asks for (None in it: that dim kept), or None if computed."""
    if site.module is not None:
        size = site.module.output_size
    else:
        params = site.call_args(("output_size", "return_indices"))
        if params is None or "output_size" not in params:
            return None
        size = params["output_size"]
    return (size, size) if not isinstance(size, (tuple, list)) else tuple(size)


def _judge_adaptive(site: Site, options: Options) -> Judgement:
    kind, size = _adaptive_kind(site), _adaptive_size(site)
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    if size is not None and all(s in (1, None) for s in size):   # None: that dim kept as it is
        over = "H, W" if all(s == 1 for s in size) else "H" if size[0] == 1 else "W"
        if kind == "average":
            return Judgement(Verdict.EXACT, f"average over {over}: keeps only the DC bin along it, commutes with shifts")
        return Judgement(Verdict.INTEGER, f"max over {over}: invariant to integer shifts only")
    grid = "a computed grid" if size is None else f"a fixed {' x '.join(map(str, size))} grid"
    fix = "; fix for a flattened head: recipe option pool.head = 'global'" if kind == "average" and \
        _flattened_after(site.node) else ""
    local = "box filter" if kind == "average" else "max"
    return Judgement(Verdict.NOT, f"adaptive {kind} pooling to {grid}: the grid moves with the input by a fractional "
                                  f"stride (H / h), neither invariant nor, as a sampled {local}, alias-free{fix}")


def _flattened_after(node: fx.Node, depth: int = 4) -> bool:
    """Some path from ``node`` reaches a flatten / view / reshape within ``depth`` ops (a fully connected head)."""
    users = list(node.users)
    for user in users:
        target = type(user.graph.owning_module.get_submodule(user.target)) if user.op == "call_module" \
            else user.target
        if target in FLATTENS or (depth > 1 and _flattened_after(user, depth - 1)):
            return True
    return False


def _global_head(site: Site, options: Options):
    """``pool.head = "global"``: an adaptive average pool to a grid before a flatten becomes the global average
    broadcast to that grid."""
    size = _adaptive_size(site)
    if options.head != "global" or _adaptive_kind(site) != "average" or size is None or None in size \
            or all(s == 1 for s in size) or site.x is None or site.x.spatial_dims != (2, 3) \
            or not _flattened_after(site.node):
        return None
    return BroadcastGlobalPool2d(size)


def _judge_broadcast(site: Site, options: Options) -> Judgement:
    h, w = site.module.output_size
    return Judgement(Verdict.EXACT, f"global average broadcast to a {h} x {w} grid (recipe option pool.head = "
                                    f"'global'): the head after it reads a spatially constant map, its weight in "
                                    f"effect summed over the {h * w} positions")


RULES = [
    Rule(name="adaptive-pool", family=FAMILY, targets=tuple(ADAPTIVE), judge=_judge_adaptive,
         strategies={"ideal": _global_head}),
    Rule(name="broadcast-pool", family=FAMILY, targets=(BroadcastGlobalPool2d,), judge=_judge_broadcast),
    Rule(name="pool", family=FAMILY, targets=POOLS + tuple(FUNCTIONAL) + (AliasFreePool2d, BlurPool2d, PolyphasePool2d,
                                                                     SubsampledPool2d), judge=_judge_pool,
         strategies={"ideal": _sampled(AliasFreePool2d), "blur": _sampled(BlurPool2d),
                     "aps": _sampled(PolyphasePool2d), "circular": _sampled(SubsampledPool2d)}),
]
