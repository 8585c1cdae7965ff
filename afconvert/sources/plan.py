"""The conversion plan of a model: what replaced which module, as plain data, so that a checkpoint
rebuilds the converted architecture without converting again (no tracing, fits or statistics).

For each replaced module path, a snapshot of the replacement: its class (only classes of
``afconvert.layers`` are ever rebuilt), its plain attributes (numbers, strings, tuples: what its
``forward`` reads), the names and shapes of its parameters and buffers, and its children, recursively.
``apply_plan`` rebuilds each from the snapshot, with empty tensors that ``load_state_dict(strict=True)``
then fills; nothing is unpickled or imported beyond ``afconvert.layers``.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

__all__ = ["PlanError", "module_plan", "apply_plan", "LAYERS_PACKAGE"]

LAYERS_PACKAGE = "afconvert.layers"
_PLAIN = (int, float, str, bool, type(None))


class PlanError(ValueError):
    """A plan that cannot be rebuilt (a class outside afconvert.layers, or data that is not plain)."""


def _is_plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _snapshot(module: nn.Module) -> dict:
    cls = type(module)
    if not cls.__module__.startswith(LAYERS_PACKAGE + "."):
        return {"class": None}  # kept source module (e.g. the activation inside a residual): rebuilt elsewhere
    attrs = {k: v for k, v in vars(module).items()
             if k not in ("_parameters", "_buffers", "_modules", "training") and _is_plain(v)}
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs, "training": module.training,
        "parameters": {k: None if p is None else [list(p.shape), str(p.dtype), p.requires_grad]
                       for k, p in module._parameters.items()},
        "buffers": {k: None if b is None else [list(b.shape), str(b.dtype), k not in module._non_persistent_buffers_set]
                    for k, b in module._buffers.items()},
        "children": {k: None if c is None else _snapshot(c) for k, c in module._modules.items()},
    }


def module_plan(model: nn.Module, paths) -> list[dict]:
    """[{"path", **snapshot}] for each replaced module path of ``model`` (a converted model)."""
    return [{"path": p, **_snapshot(model.get_submodule(p))} for p in paths]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"unknown dtype {name!r}")
    return dtype


def _rebuild(snap: dict, original: nn.Module | None) -> nn.Module:
    if snap["class"] is None:
        if original is None:
            raise PlanError("a kept submodule has no counterpart in the source model")
        return original
    module_name, _, qualname = snap["class"].rpartition(".")
    if not module_name.startswith(LAYERS_PACKAGE + ".") and module_name != LAYERS_PACKAGE:
        raise PlanError(f"refused to rebuild {snap['class']}: only afconvert.layers classes are rebuilt")
    cls = getattr(importlib.import_module(module_name), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PlanError(f"{snap['class']} is not an afconvert layer (the checkpoint is from another version)")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in snap["attrs"].items():
        if not _is_plain(v):
            raise PlanError(f"{snap['class']}.{k} is not plain data")
        object.__setattr__(new, k, v)
    for k, spec in snap["parameters"].items():
        new.register_parameter(k, None if spec is None else
                               nn.Parameter(torch.empty(spec[0], dtype=_dtype(spec[1])), requires_grad=spec[2]))
    for k, spec in snap["buffers"].items():
        new.register_buffer(k, None if spec is None else torch.empty(spec[0], dtype=_dtype(spec[1])),
                            persistent=True if spec is None else spec[2])
    for k, child in snap["children"].items():
        inner = original._modules.get(k) if original is not None else None
        new.add_module(k, None if child is None else _rebuild(child, inner))
    new.train(snap["training"])
    return new


def apply_plan(model: nn.Module, plan: list[dict]) -> nn.Module:
    """Replace, in the freshly built source ``model``, each planned module by its rebuilt replacement."""
    for entry in plan:
        path = entry["path"]
        try:
            original = model.get_submodule(path)
        except AttributeError:
            raise PlanError(f"the plan names '{path}', which this source model does not have") from None
        model.set_submodule(path, _rebuild(entry, original))
    return model
