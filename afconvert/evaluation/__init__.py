"""Shift-robustness evaluation: shift grids (``shift_grids``), the paper's metrics (``metrics``), the
batched runner over an ImageFolder (``runner``), and plots (``plots``)."""

METRICS = ("accuracy", "integer", "half", "fractional", "consistency", "bilinear", "crop", "equivariance", "curve")
METRIC_ALIASES = {"certified": ("integer", "half", "fractional"),
                  "default": ("accuracy", "integer", "half", "fractional", "consistency"), "all": METRICS}
