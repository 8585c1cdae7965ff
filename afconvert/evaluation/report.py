"""Evaluation results as a table for people and as JSON for programs."""
from __future__ import annotations

import json
import math
from typing import Sequence

__all__ = ["format_table", "to_json"]


def _cell(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_table(results: Sequence[dict]) -> str:
    """One row per model: accuracy, certified integer / half / fractional, consistency, non-finite, time."""
    head = ["model", "images", "top-1", "top-5", "cert-int", "cert-half", "cert-frac", "consist", "consist-frac",
            "nonfinite", "time"]
    rows = [[r["model"], str(r["images"]), _cell(r["accuracy"]), _cell(r["accuracy_top5"]),
             _cell(r["certified_integer"]), _cell(r["certified_half"]), _cell(r["certified_fractional"]),
             _cell(r["consistency"]), _cell(r["consistency_fractional"]), _cell(r["nonfinite"], "{:.0f}%"),
             f"{r['wall_time_s']:.0f} s" if r["wall_time_s"] >= 10 else f"{r['wall_time_s']:.1f} s"] for r in results]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    for r in results:
        extra = []
        if r.get("certified_bilinear") is not None:
            extra.append(f"certified bilinear {_cell(r['certified_bilinear'])}")
        if r.get("crop_shift"):
            c = r["crop_shift"]
            extra.append(f"crop-shift accuracy k=0..{c['k'][-1]}: " + " ".join(_cell(a, "{:.0f}") for a in c["accuracy"])
                         + f" (all windows: {_cell(c['certified'])})")
        if r.get("logit_change"):
            lc = r["logit_change"]
            extra.append("logit change at (1/2, 1/2): band-limited " + _mid(lc, "band_limited")
                         + ", bilinear " + _mid(lc, "bilinear"))
        if r.get("unreadable"):
            extra.append(f"{r['unreadable']} unreadable image(s) skipped")
        if r.get("equivariance"):
            extra.append("equivariance diff: " + ", ".join(f"{k} {_cell(v, '{:.2e}')}" for k, v in r["equivariance"].items()))
        if extra:
            lines.append(f"{r['model']}: " + "; ".join(extra))
    if results:
        g = results[0]["grids"]
        lines.append("grids: " + ", ".join(f"{v['spec']} ({v['count']} shifts)" if "count" in v else v["spec"]
                                          for v in g.values()))
        lines.append("certified = correct on the image and on every shift of its grid: of the image for integer "
                     "grids, of the band-limited image (Nyquist bins zeroed) otherwise; non-finite logits count as "
                     "wrong")
    return "\n".join(lines)


def _mid(lc: dict, key: str) -> str:
    t = lc["t"]
    i = min(range(len(t)), key=lambda j: abs(t[j] - 0.5))
    return _cell(lc[key][i], "{:.2e}")


def _clean(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(results: Sequence[dict]) -> str:
    """The results as a JSON list (non-finite numbers as null)."""
    return json.dumps(_clean(list(results)), indent=2)
