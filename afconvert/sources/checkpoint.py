"""Self-describing checkpoints: enough to rebuild the converted model, and nothing to unpickle.

    {"format": "afconvert/2", "source": {"library", "name", "kwargs", "weights"},
     "recipe": {"name", "options"}, "input_size": [H, W], "in_chans": C,
     "plan": [{"path", "class", "attrs", ...}] or None, "versions": {"afconvert", "torch", "timm"},
     "data_config": {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}, "state_dict": {...}}

``load`` creates the source model, applies the plan (``afconvert.sources.plan``: the replaced
modules rebuilt from plain data, no conversion) and loads the state_dict strictly. A model whose
functional calls were rewritten into a traced graph (no plan) and checkpoints of format
``afconvert/1`` are rebuilt by converting again with the saved recipe. Files are read with
``torch.load(weights_only=True)``. The data config (timm's, as the model was trained or converted) becomes
the loaded model's ``pretrained_cfg``, so evaluation and any user prepare its inputs as in training.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from afconvert.atomic import atomic_torch_save
from afconvert.converter.info import ConversionInfo
from afconvert.converter.recipe import load_recipe
from afconvert.data import data_config, set_data_config
from afconvert.sources.models import SourceSpec, load_error
from afconvert.sources.plan import PlanError, apply_plan, module_plan

__all__ = ["save", "load", "CheckpointError", "FORMAT"]

FORMAT = "afconvert/2"
FORMATS = ("afconvert/1", FORMAT)


class CheckpointError(ValueError):
    """An afconvert checkpoint that cannot be read or does not describe a model."""


def _versions() -> dict:
    from afconvert import __version__
    out = {"afconvert": __version__, "torch": str(torch.__version__)}
    try:
        import timm
        out["timm"] = str(timm.__version__)
    except ImportError:
        pass
    return out


def _plain_config(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def save(model: nn.Module, path: str | Path) -> None:
    """Write a converted model (from ``afconvert.convert`` of a named source) to ``path`` atomically."""
    info = getattr(model, "afconvert_info", None)
    if not info:
        raise CheckpointError("this model was not made by afconvert.convert: nothing says how to rebuild it; "
                              "fix: convert it first (afconvert.convert(model))")
    source = info.source
    if source is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture")
        if not arch:
            raise CheckpointError("cannot tell which model to rebuild at load time (not a timm model); fix: build it "
                                  "by name (afconvert.build('timm:NAME')) or save model.state_dict() yourself")
        kwargs = {"num_classes": getattr(model, "num_classes", 1000)}
        source = SourceSpec(arch, "timm", kwargs, weights="from this checkpoint").to_dict()
    plan = None if info.graph_module else module_plan(model, info.replaced)
    ckpt = {"format": FORMAT, "source": source, "recipe": {"name": info.recipe, "options": info.options},
            "input_size": list(info.input_size), "in_chans": info.in_chans, "plan": plan,
            "data_config": _plain_config(data_config(model)), "versions": _versions(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    atomic_torch_save(path, ckpt)


def read(path: str | Path) -> dict:
    """The checkpoint's contents, checked, without building anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error(exc)}; fix: re-create it with "
                              f"`afconvert MODEL --out {path.name}`") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in FORMATS:
        raise CheckpointError(f"{path} is not an afconvert checkpoint (no format '{FORMAT}'); fix: load plain "
                              f"state_dicts with `afconvert MODEL --weights {path.name}`")
    return ckpt


def _recipe_of(ckpt: dict):
    """The saved recipe. Format afconvert/1 predates scale-equivariant activations and typed recipes:
    its activations are plain polynomials, and its [norm] had a 'layernorm' key that did nothing. A recipe
    saved before [activation] had ``scale`` took the L4 scale."""
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in ckpt["recipe"]["options"].items()}
    if isinstance(options.get("activation"), dict):
        options["activation"].setdefault("scale", "l4")
    if ckpt["format"] == "afconvert/1":
        options.setdefault("activation", {}).setdefault("normalize", "none")
        options.get("norm", {}).pop("layernorm", None)
    return load_recipe({"name": ckpt["recipe"]["name"], **options})


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the converted model saved at ``path`` and load its weights (strict). Returns it in eval mode."""
    from afconvert.sources.models import create_source_model
    from afconvert.sources.pipeline import rebuild
    ckpt = read(path)
    spec = SourceSpec.from_dict(ckpt["source"])
    recipe = _recipe_of(ckpt)
    try:
        if ckpt.get("plan") is not None:
            model, _ = create_source_model(f"{spec.library}:{spec.name}", pretrained=False, **spec.kwargs)
            apply_plan(model, ckpt["plan"])
            model.afconvert_info = ConversionInfo(recipe.name, recipe.to_dict(), ckpt["input_size"], ckpt["in_chans"],
                                                  [e["path"] for e in ckpt["plan"]], source=spec.to_dict())
        else:
            model = rebuild(spec, recipe, ckpt["input_size"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, PlanError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the rebuilt {spec.name} "
                              f"({str(exc).splitlines()[0]}); fix: load it with the afconvert/timm versions that "
                              f"wrote it: {ckpt.get('versions')}") from exc
    if ckpt.get("data_config"):
        set_data_config(model, ckpt["data_config"])
    return model.to(map_location).eval()
