"""afconvert: make any pretrained convnet alias-free (Michaeli, Michaeli, Soudry, CVPR 2023).

    import afconvert
    model = afconvert.convert(timm.create_model("convnext_tiny"))   # alias-free copy
    print(model.afconvert_report)                                     # what was replaced, verdict
"""
from .conv import AliasFreeConv2d, CircularConv2d, circular_pad
from .engine import audit, convert
from .norm import AliasFreeLayerNorm
from .poly import AliasFreePolyActivation, LowpassPolyActivation, PolyActivation, ResidualActivation, fit_polynomial
from .recipes import list_recipes, load_recipe
from .report import NotAliasFreeError, Report
from .shift_check import relative_logit_change, shift_check
from .spectral import fractional_shift, ideal_downsample, ideal_lowpass, ideal_resample, ideal_upsample, zero_nyquist
from .tracing import UntraceableModelError
from .checkpoint import load, save
from .pipeline import build

__version__ = "0.1.0"

__all__ = [
    "convert", "audit", "save", "load", "build", "list_recipes", "load_recipe", "Report", "NotAliasFreeError", "UntraceableModelError",
    "AliasFreeConv2d", "CircularConv2d", "circular_pad", "AliasFreeLayerNorm", "PolyActivation",
    "AliasFreePolyActivation", "LowpassPolyActivation", "ResidualActivation", "fit_polynomial",
    "fractional_shift", "ideal_downsample", "ideal_upsample", "ideal_lowpass", "ideal_resample", "zero_nyquist",
    "relative_logit_change", "shift_check",
]
