"""Which dims of every traced tensor are spatial (H, W), found by running the graph at three sizes.

Shape propagation at one size cannot tell H from a channel dim of the same length, and op-by-op
rules miss permutes, reshapes and layers nobody wrote a rule for. Running the traced graph at
(H, W), (2H, W) and (H, 2W) answers it for every node at once: a dim that changes with H is the
H dim, one that changes with W is W, one that changes with both is a flattened map (a VGG head).

A dim of fixed length can still hold positions: an adaptive pool to a k x k grid, a resize to a
given size, a window split off H, everything after a node that runs at one size only. So size alone
never makes a tensor spatially constant: a second pass carries each input's spatial dims through
the graph by shape (``_carry``): kept where an op keeps the rank (a pool to 7 x 7 keeps H and
W), mapped through reshapes and permutes, dropped only where an op reduces the dims away or a
fully connected layer consumes a flattened map, and where the tensor is measured constant along
the dim (a global mean broadcast to a grid). A tensor none of whose dims holds positions is
spatially constant (after global pooling, an SE gate).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from afconvert.settings import SettingError

__all__ = ["Layout", "infer_layouts", "layout_of", "WrongInputSizeError"]


class WrongInputSizeError(ValueError):
    """The model cannot run at the probe input size."""


@dataclass(frozen=True)
class Layout:
    """The spatial role of each dim of one tensor: ``roles[d]`` is 'H', 'W', 'HW' (mixed) or ''."""

    shape: tuple[int, ...]
    roles: tuple[str, ...]
    dtype: torch.dtype = torch.float32
    fixed: bool = False     # its values do not depend on the input's content (a weight, a pattern resized to the
                            # map's size): it does not move when the input does

    @property
    def is_spatial(self) -> bool:
        return any(self.roles)

    @property
    def spatial_dims(self) -> tuple[int, int] | None:
        """(H dim, W dim) when H and W are each exactly one dim of their own, else None (a flattened map, a
        window split off H, or a map with only one of them)."""
        spatial = [r for r in self.roles if r]
        if sorted(spatial) == ["H", "W"]:
            return self.roles.index("H"), self.roles.index("W")
        return None

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        """(H, W) when both exist as separate dims, else None."""
        dims = self.spatial_dims
        return None if dims is None else (self.shape[dims[0]], self.shape[dims[1]])

    @property
    def mixed(self) -> bool:
        """A dim mixes H and W (a flattened map), H or W is split over several dims, or only one is present."""
        return self.is_spatial and self.spatial_dims is None

    @property
    def channel_dim(self) -> int | None:
        """The one non-batch, non-spatial dim (C), when there is exactly one."""
        free = [d for d, r in enumerate(self.roles) if d > 0 and not r]
        return free[0] if len(free) == 1 else None

    @property
    def channels(self) -> int | None:
        cd = self.channel_dim
        return None if cd is None else self.shape[cd]


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the shape and dtype of every node's output."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = _shapes_of(out)
        return out


def _shapes_of(value: Any):
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return [_shapes_of(v) for v in value]
    return None


def layout_of(base, tall, wide) -> Layout | list | None:
    """The ``Layout`` of a value from its (shape, dtype) at input sizes (H, W), (2H, W) and (H, 2W) (lists of
    them for a list of values; None for a non-tensor): the dims whose size follows H or W."""
    if isinstance(base, tuple):
        (s0, dtype), (sh, _), (sw, _) = base, tall, wide
        if len(s0) != len(sh) or len(s0) != len(sw):
            return Layout(s0, ("HW",) * len(s0), dtype)  # rank depends on size: treat as mixed
        roles = tuple(("H" if a != b else "") + ("W" if a != c else "") for a, b, c in zip(s0, sh, sw))
        return Layout(s0, roles, dtype)
    if isinstance(base, list):
        return [layout_of(b, t, w) for b, t, w in zip(base, tall, wide)]
    return None


def _union(*roles: str) -> str:
    """The letters of several roles as one role: '', 'H', 'W' or 'HW'."""
    return "".join(sorted(set("".join(roles))))


RESHAPES = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, nn.Flatten, nn.Unflatten)
PERMUTES = ("permute", "transpose", "swapaxes", torch.permute, torch.transpose, torch.swapaxes)


def _kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """'reshape', 'permute' or 'other': how an op moves its input's elements between dims."""
    target = type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target
    return "reshape" if target in RESHAPES else "permute" if target in PERMUTES else "other"


def _reshaped(x: Layout, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Roles of ``x``'s elements laid out as ``shape`` in the same (row-major) order: an output dim holds the
    roles of every input dim whose index range it overlaps (splitting H into blocks of rows gives two H dims)."""
    def spans(sh):
        out, stride = [], 1
        for n in reversed(sh):
            out.append((stride, stride * n))
            stride *= n
        return out[::-1]
    ins = [(lo, hi, r) for (lo, hi), r, n in zip(spans(x.shape), x.roles, x.shape) if r and n > 1]
    return tuple(_union(*(r for lo, hi, r in ins if lo < b and a < hi)) if n > 1 else ""
                 for (a, b), n in zip(spans(shape), shape))


def _permuted(node: fx.Node, x: Layout, rank: int) -> tuple[str, ...] | None:
    """``x``'s roles under a permute / transpose with constant dims, else None."""
    args = list(node.args[1:])
    if any(isinstance(a, fx.Node) for a in args) or len(x.roles) != rank:
        return None
    if node.target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(dims) != rank:
            return None
        return tuple(x.roles[d % rank] for d in dims)
    d0, d1 = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
    if not isinstance(d0, int) or not isinstance(d1, int):
        return None
    roles = list(x.roles)
    roles[d0 % rank], roles[d1 % rank] = roles[d1 % rank], roles[d0 % rank]
    return tuple(roles)


def _aligned(x: Layout, shapes: list[tuple[int, ...]], in_shapes: list[tuple[int, ...]]) -> tuple[str, ...]:
    """Roles an op that neither reshapes nor permutes carries from input ``x`` to an output of ``shapes[0]``
    (``shapes``/``in_shapes``: output / input shapes at each size the node ran at). Rank kept or grown: dims
    aligned from the right (broadcasting), a single H or W kept when its length changes (a resampling, a pool
    to a grid), a flattened map dropped when its length changes (a fully connected layer consumed it). Rank
    reduced: the input dims removed are those whose removal leaves the output's shape at every size (the
    union over every such choice)."""
    out = shapes[0]
    if len(out) >= len(x.roles):
        off = len(out) - len(x.roles)
        roles = [""] * len(out)
        for d, r in enumerate(x.roles):
            if r and (len(r) == 1 or x.shape[d] == out[d + off]):
                roles[d + off] = r
        return tuple(roles)
    roles = [""] * len(out)
    for kept in itertools.combinations(range(len(x.roles)), len(out)):
        if all(tuple(si[d] for d in kept) == so for si, so in zip(in_shapes, shapes)):
            for j, d in enumerate(kept):
                roles[j] = _union(roles[j], x.roles[d])
    return tuple(roles)


def _carry(node: fx.Node, gm: fx.GraphModule, out: Layout, x: Layout, shapes, in_shapes) -> Layout:
    """``out`` with the spatial roles of input ``x`` carried into its fixed-length dims."""
    kind = _kind(node, gm)
    carried = _reshaped(x, out.shape) if kind == "reshape" else \
        (_permuted(node, x, len(out.shape)) if kind == "permute" else None)
    if carried is None and kind == "permute":  # computed dims: every dim may hold positions
        carried = (_union(*x.roles),) * len(out.shape)
    if carried is None:
        carried = _aligned(x, shapes, in_shapes)
    roles = tuple(_union(a, b) if n > 1 else a for a, b, n in zip(out.roles, carried, out.shape))
    return Layout(out.shape, roles, out.dtype, out.fixed)


def _inputs(node: fx.Node, layouts: dict, runs: list[dict]) -> list[tuple[Layout, list]]:
    """The tensor inputs of ``node`` as (layout, its shape at each size the node ran at); an element of a list
    for ``getitem`` of a constant index."""
    out = []
    for a in node.all_input_nodes:
        lay, shapes = layouts.get(a.name), [r.get(a.name) for r in runs if node.name in r]
        if isinstance(lay, list) and node.target is operator.getitem and isinstance(node.args[1], int) \
                and node.args[1] < len(lay):
            lay, shapes = lay[node.args[1]], [s[node.args[1]] if isinstance(s, list) else None for s in shapes]
        if isinstance(lay, Layout) and lay.is_spatial:
            out.append((lay, [s[0] if isinstance(s, tuple) else None for s in shapes]))
    return out


def _carry_all(gm: fx.GraphModule, sized: dict, runs: list[dict], constant: dict[str, set[int]]
               ) -> tuple[dict, dict[str, set[int]]]:
    """Every node's layout with its inputs' spatial roles carried by shape (``_carry``), in graph order; letters
    on the dims that ``constant`` names (node -> dims measured constant) dropped. Also returns, per node, the
    fixed-length dims that got a role this way (where a measurement may find the tensor constant)."""
    layouts, carried = dict(sized), {}
    for n in gm.graph.nodes:
        out = sized.get(n.name)
        if n.op in ("placeholder", "get_attr", "output") or out is None:
            continue
        ins = _inputs(n, layouts, runs)
        if not ins:
            continue
        outs = out if isinstance(out, list) else [out]
        new = []
        for k, o in enumerate(outs):
            if not isinstance(o, Layout):
                new.append(o)
                continue
            shapes = [r[n.name][k][0] if isinstance(out, list) else r[n.name][0] for r in runs if n.name in r]
            for x, in_shapes in ins:
                if None not in in_shapes and len(in_shapes) == len(shapes):
                    o = _carry(n, gm, o, x, shapes, in_shapes)
            if not isinstance(out, list):
                drop = constant.get(n.name, set())
                o = Layout(o.shape, tuple("" if d in drop else r for d, r in enumerate(o.roles)), o.dtype, o.fixed)
                extra = {d for d, (a, b) in enumerate(zip(out.roles, o.roles)) if b and a != b}
                if extra:
                    carried[n.name] = extra
            new.append(o)
        layouts[n.name] = new if isinstance(out, list) else new[0]
    return layouts, carried


METADATA = ("size", "dim", "ndim", "shape", "numel")


def _reads_metadata(node: fx.Node) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()``, ...: the node reads its input's shape, not its values."""
    if node.op == "call_method":
        return node.target in METADATA
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


def _mark_fixed(gm: fx.GraphModule, layouts: dict) -> dict:
    """``layouts`` with ``fixed`` set on every tensor whose values no path from the input reaches except through
    its shape (weights, and patterns resized to the map's size)."""
    live: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (not _reads_metadata(n) and any(a.name in live for a in n.all_input_nodes)):
            live.add(n.name)

    def mark(lay):
        if isinstance(lay, list):
            return [mark(v) for v in lay]
        return Layout(lay.shape, lay.roles, lay.dtype, fixed=True) if isinstance(lay, Layout) else lay
    return {name: lay if name in live else mark(lay) for name, lay in layouts.items()}


class _Variation(fx.Interpreter):
    """Runs the graph and records, for the nodes in ``dims``, which of those dims the output is constant along
    (to float rounding)."""

    def __init__(self, module: fx.GraphModule, dims: dict[str, set[int]]):
        super().__init__(module)
        self.dims, self.constant = dims, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.dims and isinstance(out, torch.Tensor) and out.is_floating_point():
            scale = float(out.abs().max()) * 1e-5 + torch.finfo(out.dtype).tiny
            self.constant[n.name] = {d for d in self.dims[n.name]
                                     if float((out - out.narrow(d, 0, 1)).abs().max()) <= scale}
        return out


def infer_layouts(gm: fx.GraphModule, input_size: tuple[int, int], in_chans: int = 3,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], str | None]:
    """Map each node name to its output ``Layout`` (or a list of them, or None for non-tensors).

    Also returns the node at which a model that runs only at ``input_size`` (a fixed-size layer,
    e.g. a fully connected head over the flattened map) fails at the other sizes, else None.
    Nodes after that one are seen at one size only: their roles are those carried from their inputs.
    """
    h, w = input_size
    runs, fixed_at = [], None
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), dtype)
    for i, size in enumerate(((h, w), (2 * h, w), (h, 2 * w))):
        rec = _Recorder(gm)
        x = torch.randn(1, in_chans, *size, dtype=dtype, device=device)
        try:
            with torch.no_grad():
                rec.run(x)
        except SettingError:
            raise               # a bad setting is its own one-line error, not a wrong input size
        except Exception as exc:
            if i == 0:
                raise WrongInputSizeError(
                    f"the model does not run at input size {size[0]}x{size[1]} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); fix: pass an input size the model accepts "
                    f"(input_size=(H, W), --input-size H W), e.g. a multiple of its total stride") from exc
            failed = next((n.name for n in gm.graph.nodes if n.name not in rec.shapes), None)
            fixed_at = fixed_at or failed
        runs.append(rec.shapes)
    base, tall, wide = runs
    sized = {name: layout_of(base[name], tall.get(name, base[name]), wide.get(name, base[name])) for name in base}
    sized = _mark_fixed(gm, sized)
    layouts, carried = _carry_all(gm, sized, runs, {})
    if carried:  # measure whether the tensors that got roles by shape vary along those dims at all
        probe = _Variation(gm, carried)
        with torch.no_grad():
            probe.run(torch.randn(1, in_chans, h, w, dtype=dtype, device=device))
        if any(probe.constant.values()):
            layouts, _ = _carry_all(gm, sized, runs, probe.constant)
    return layouts, fixed_at
