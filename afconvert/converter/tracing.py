"""torch.fx tracing that is timm-aware and says precisely why a model cannot be traced.

Leaves are the modules that rules target (so timm's GELU stays a module instead of becoming
``F.gelu``), afconvert's own layers, and plain ``torch.nn`` layers. timm's untraceable helper
functions are wrapped (kept as opaque calls), but timm's leaf-module list is *not* reused: it
hides convolutions inside leaves (``BatchNormAct2d`` holds its activation, ``vgg.ConvMlp``
holds convs).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.proxy import ParameterProxy

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
    """A tracer whose leaves are ``leaf_types`` (exact types), the modules at ``opaque`` paths,
    afconvert's layers and torch.nn layers."""

    def __init__(self, leaf_types: Iterable[type] = (), opaque: Iterable[str] = ()):
        super().__init__(autowrap_functions=tuple(_timm_notrace_functions()), param_shapes_constant=True)
        self.leaf_types = frozenset(leaf_types)
        self.opaque = frozenset(opaque)
        self._names: tuple[dict[int, str], dict[int, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or module_qualified_name in self.opaque:
            return True
        if type(m).__module__.startswith("afconvert."):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._names = None
        return super().trace(root, concrete_args)

    def _name_of(self, t: torch.Tensor) -> str | None:
        """The qualified name of a parameter (or, for other tensors, a buffer) of the root, or None.
        fx finds it by a linear search of ``named_parameters()`` / ``named_buffers()`` at every use
        (quadratic in the model's size); here a map, built once per trace (see docs/performance.md)."""
        if self._names is None:
            self._names = tuple({} for _ in range(2))
            for names, items in zip(self._names, (self.root.named_parameters(), self.root.named_buffers())):
                for name, value in items:
                    names.setdefault(id(value), name)
        return self._names[0 if isinstance(t, nn.Parameter) else 1].get(id(t))

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's own semantics: a proxy per parameter (and buffer), cached; looked up by ``_name_of``."""
        wanted = isinstance(attr_val, nn.Parameter) or (self.proxy_buffer_attributes
                                                         and isinstance(attr_val, torch.Tensor))
        name = self._name_of(attr_val) if wanted else None
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def create_arg(self, a):
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy) and (name := self._name_of(a)) is not None:
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "afconvert_module_path"):  # the innermost module is where it failed
                exc.afconvert_module_path = self.path_of_module(m)
            raise


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def trace(model: nn.Module, leaf_types: Iterable[type] = (), fallback: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model``.

    A submodule whose forward cannot be traced (data-dependent control flow, untraceable calls) is
    kept whole as an *opaque* leaf, when ``fallback``: the graph then has one node for it, and
    ``gm.afconvert_opaque`` maps its path to the reason (the converter reports such a module, it
    never certifies it). A failure outside any submodule raises ``UntraceableModelError``.
    """
    opaque: dict[str, str] = {}
    while True:
        tracer = AFTracer(leaf_types, opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # fx raises many types; report them all the same way
            where = getattr(exc, "afconvert_module_path", "")
            if fallback and where and where not in opaque:
                opaque[where] = _reason(exc)
                continue
            inner = type(model.get_submodule(where)).__name__ if where else type(model).__name__
            raise UntraceableModelError(
                f"cannot trace {type(model).__name__}: {'module ' + repr(where) if where else 'its forward'} "
                f"({inner}) does data-dependent Python control flow or calls untraceable code ({_reason(exc)}); "
                f"fix: make that forward traceable, or pass leaf_modules=[{inner}] to keep it whole") from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.afconvert_opaque = opaque
    return gm
