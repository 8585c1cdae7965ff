"""afconvert: make any pretrained convnet alias-free (Michaeli, Michaeli, Soudry, CVPR 2023).

    import afconvert
    model = afconvert.convert(timm.create_model("convnext_tiny"))   # alias-free copy
    print(model.afconvert_report)                                     # what was replaced, verdict

Sub-packages by role: ``layers`` (the alias-free layers, usable alone), ``converter`` (trace,
layouts, rules, recipes, engine, certificate), ``sources`` (model names, weights, checkpoints),
``evaluation`` (shift grids, metrics, runner, plots), ``cli``, ``train``; ``data`` loads images
for all of them; ``rules`` (installed from the top-level ``rules/``) holds the conversion rules.
The names below are imported on first use, so ``import afconvert`` (and the CLI's ``--help``)
does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "convert": "afconvert.converter.engine", "audit": "afconvert.converter.engine",
    "save": "afconvert.sources.checkpoint", "load": "afconvert.sources.checkpoint",
    "build": "afconvert.sources.pipeline",
    "list_recipes": "afconvert.converter.recipe", "load_recipe": "afconvert.converter.recipe",
    "Report": "afconvert.converter.report", "NotAliasFreeError": "afconvert.converter.report",
    "UntraceableModelError": "afconvert.converter.tracing",
    "relative_logit_change": "afconvert.converter.certify", "shift_check": "afconvert.converter.certify",
    "AliasFreeConv2d": "afconvert.layers.conv", "CircularConv2d": "afconvert.layers.conv",
    "circular_pad": "afconvert.layers.conv", "AliasFreeLayerNorm": "afconvert.layers.norm",
    "PolyActivation": "afconvert.layers.poly", "AliasFreePolyActivation": "afconvert.layers.poly",
    "LowpassPolyActivation": "afconvert.layers.poly", "ResidualActivation": "afconvert.layers.poly",
    "fit_polynomial": "afconvert.layers.poly",
    "fractional_shift": "afconvert.layers.spectral", "ideal_downsample": "afconvert.layers.spectral",
    "ideal_upsample": "afconvert.layers.spectral", "ideal_lowpass": "afconvert.layers.spectral",
    "ideal_resample": "afconvert.layers.spectral", "zero_nyquist": "afconvert.layers.spectral",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'afconvert' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
