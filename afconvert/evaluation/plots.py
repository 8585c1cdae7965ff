"""The picture of an evaluation: how much the logits move under sub-pixel shifts, and how accuracy
holds up when the crop window moves (``afconvert eval --plot FILE.png``).

Left: relative logit change ||f(shift(x, (t, t))) - f(x)|| / ||f(x)|| against t in [0, 1], band-limited
shift of P(x) (solid) and bilinear shift of x (dashed), mean over images, log scale. Right:
crop-shift accuracy (%) against the window move k (pixels, mean of right and down moves).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from afconvert.atomic import atomic_savefig

__all__ = ["require_matplotlib", "plot_results"]


def require_matplotlib() -> None:
    """Raise a one-line ImportError naming the fix when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib; fix: pip install matplotlib") from None


def _positive(ts, values):
    pts = [(t, v) for t, v in zip(ts, values or []) if v is not None and v > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_results(results: Sequence[dict], path: str | Path, title: str | None = None) -> None:
    """Draw the two panels for every model in ``results`` (``afconvert eval`` result dicts) and write
    the PNG atomically."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator


    fig = Figure(figsize=(10, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for i, r in enumerate(results):
        c = colors[i % len(colors)]
        name = r["model"] if len(r["model"]) <= 32 else "..." + r["model"][-29:]
        bad = r.get("nonfinite") and r["nonfinite"] >= 100
        lc = r.get("logit_change")
        if lc:
            drawn = False
            for key, style in (("band_limited", "-"), ("bilinear", "--")):
                t, v = _positive(lc["t"], lc[key])
                if t:
                    ax1.plot(t, v, style, color=c, marker="o", ms=3,
                             label=f"{name} ({'band-limited' if key == 'band_limited' else 'bilinear'})")
                    drawn = True
            if not drawn:
                ax1.plot([], [], color=c, label=f"{name}: {'non-finite logits' if bad else 'no change'}")
        cs = r.get("crop_shift")
        if cs:
            pts = [(k, a) for k, a in zip(cs["k"], cs["accuracy"]) if a is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=c, ms=3,
                     label=name + (" (non-finite logits: all wrong)" if bad else ""))
    ax1.set_yscale("log")
    ax1.set_xlabel("sub-pixel shift t (image shifted by (t, t) px)")
    ax1.set_ylabel("relative logit change")
    ax1.set_title("logits under sub-pixel shifts", fontsize=10)
    ax1.set_xlim(0, 1)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("crop window moved by k px (right / down, no wrap-around)")
    ax2.set_ylabel("top-1 accuracy (%)")
    ax2.set_title("crop-shift (camera translation)", fontsize=10)
    ax2.set_ylim(-3, 103)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    if results:
        n = results[0].get("images")
        fig.suptitle(title or f"shift robustness on {n} images", fontsize=11)
    fig.tight_layout()
    atomic_savefig(path, fig)
