"""torch.fx tracing that is timm-aware and says precisely why a model cannot be traced.

Leaves are the modules that rules target (so timm's GELU stays a module instead of becoming
``F.gelu``), afconvert's own layers, and plain ``torch.nn`` layers. timm's untraceable helper
functions are wrapped (kept as opaque calls), but timm's leaf-module list is *not* reused: it
hides convolutions inside leaves (``BatchNormAct2d`` holds its activation, ``vgg.ConvMlp``
holds convs).
"""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx
import torch.nn as nn

__all__ = ["UntraceableModelError", "AFTracer", "trace"]


class UntraceableModelError(RuntimeError):
    """The model cannot be traced by torch.fx; the message names the module and the reason."""


def _timm_notrace_functions() -> list:
    try:
        from timm.layers import _fx
    except ImportError:  # timm is optional at this level
        return []
    return list(_fx.get_notrace_functions())


class AFTracer(fx.Tracer):
    """A tracer whose leaves are ``leaf_types`` (exact types), afconvert's layers and torch.nn layers."""

    def __init__(self, leaf_types: Iterable[type] = ()):
        super().__init__(autowrap_functions=tuple(_timm_notrace_functions()), param_shapes_constant=True)
        self.leaf_types = frozenset(leaf_types)
        self.module_stack_names: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or type(m).__module__.startswith("afconvert."):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.module_stack_names.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "afconvert_module_path"):  # the innermost module is where it failed
                exc.afconvert_module_path = path
            raise
        finally:
            self.module_stack_names.pop()


def trace(model: nn.Module, leaf_types: Iterable[type] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``UntraceableModelError`` naming where and why it fails."""
    tracer = AFTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; report them all the same way
        where = getattr(exc, "afconvert_module_path", "")
        inner = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        where = where or "<top-level forward>"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableModelError(
            f"cannot trace {type(model).__name__}: module '{where}' ({inner}) does data-dependent Python "
            f"control flow or calls untraceable code ({type(exc).__name__}: {reason}); "
            f"fix: register that module as a leaf (convert(..., leaf_modules=[{inner}])) or make its forward traceable"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
