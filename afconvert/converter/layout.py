"""Which dims of every traced tensor are spatial (H, W), found by running the graph at three sizes.

Shape propagation at one size cannot tell H from a channel dim of the same length, and op-by-op
rules miss permutes, reshapes and layers nobody wrote a rule for. Running the traced graph at
(H, W), (2H, W) and (H, 2W) answers it for every node at once: a dim that changes with H is the
H dim, one that changes with W is W, one that changes with both is a flattened map (a VGG head),
and a tensor none of whose dims change is spatially constant (after global pooling, an SE gate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Layout", "infer_layouts", "layout_of", "WrongInputSizeError"]


class WrongInputSizeError(ValueError):
    """The model cannot run at the probe input size."""


@dataclass(frozen=True)
class Layout:
    """The spatial role of each dim of one tensor: ``roles[d]`` is 'H', 'W', 'HW' (mixed) or ''."""

    shape: tuple[int, ...]
    roles: tuple[str, ...]
    dtype: torch.dtype = torch.float32

    @property
    def is_spatial(self) -> bool:
        return any(self.roles)

    @property
    def spatial_dims(self) -> tuple[int, int] | None:
        """(H dim, W dim) when both exist as separate dims, else None."""
        if "H" in self.roles and "W" in self.roles and "HW" not in self.roles:
            return self.roles.index("H"), self.roles.index("W")
        return None

    @property
    def spatial_size(self) -> tuple[int, int] | None:
        """(H, W) when both exist as separate dims, else None."""
        dims = self.spatial_dims
        return None if dims is None else (self.shape[dims[0]], self.shape[dims[1]])

    @property
    def mixed(self) -> bool:
        """A dim mixes H and W (a flattened map), or only one of them is present."""
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
    them for a list of values; None for a non-tensor)."""
    if isinstance(base, tuple):
        (s0, dtype), (sh, _), (sw, _) = base, tall, wide
        if len(s0) != len(sh) or len(s0) != len(sw):
            return Layout(s0, ("HW",) * len(s0), dtype)  # rank depends on size: treat as mixed
        roles = tuple(("H" if a != b else "") + ("W" if a != c else "") for a, b, c in zip(s0, sh, sw))
        return Layout(s0, roles, dtype)
    if isinstance(base, list):
        return [layout_of(b, t, w) for b, t, w in zip(base, tall, wide)]
    return None


def infer_layouts(gm: fx.GraphModule, input_size: tuple[int, int], in_chans: int = 3,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], str | None]:
    """Map each node name to its output ``Layout`` (or a list of them, or None for non-tensors).

    Also returns the node at which a model that runs only at ``input_size`` (a fixed-size layer,
    e.g. a fully connected head over the flattened map) fails at the other sizes, else None.
    Nodes after that one are seen at one size only and taken as spatially constant.
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
    return {name: layout_of(base[name], tall.get(name, base[name]), wide.get(name, base[name])) for name in base}, fixed_at
