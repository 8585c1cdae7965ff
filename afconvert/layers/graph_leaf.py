"""How afconvert's layers meet PyTorch's graph tools: each is one node of a traced graph, and TorchScript's
compiler is refused with the fix.

The layers' Python code reads sizes and settings (which resampling form, which slices) to pick their
computation. ``torch.jit.trace``, ``torch.export`` and ``torch.compile`` run that code on real or fake tensors
and record what it did; ``torch.fx`` symbolic tracing (torchvision's ``create_feature_extractor``, timm's
feature wrappers) cannot, since a symbolic size cannot choose a branch, so there a layer records itself as one
``call_module`` node, as a leaf module does. ``torch.jit.script`` compiles Python source, which these layers are
not written for: it is refused in one line that names the runtimes that work.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["GraphLeaf", "SCRIPT_REFUSAL"]

SCRIPT_REFUSAL = ("torch.jit.script cannot compile afconvert's alias-free layers (their Python code chooses by "
                  "sizes); fix: torch.jit.trace(model, example) at the size you deploy, or "
                  "torch.export.export(model, (example,))")


def _as_leaf(forward):
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
        if proxy is None:
            return forward(self, *args, **kwargs)
        tracer = proxy.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)
    return run


class GraphLeaf:
    """Mixin of afconvert's layers: under ``torch.fx`` symbolic tracing the layer is one ``call_module`` node
    (every ``forward`` a subclass defines is wrapped so); ``torch.jit.script`` raises ``SCRIPT_REFUSAL``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = _as_leaf(cls.__dict__["forward"])

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_REFUSAL)
