"""Shift grids for the shift-robustness metrics, and the ``--grid`` spec that chooses them.

A grid is a finite set of (dy, dx) shifts in pixels (rows, columns). A shift moves the content
down/right: ``y[n] = x[n - d]`` (``afconvert.fractional_shift``; integer shifts are ``torch.roll``).

Kinds (one token each in a spec, ``KIND:VALUE``):

* ``integer:LO..HI`` every (dy, dx) with dy, dx in {LO, ..., HI}; axis-aligned shifts (one
  component 0) included. ``integer:HI`` means ``0..HI``.
* ``half:LO..HI`` every shift of ``integer:LO..HI`` plus (0.5, 0), (0, 0.5), (0.5, 0.5): the
  half-pixel lattice {(i + a, j + b) | LO <= i, j <= HI, a, b in {0, 1/2}}.
* ``fractional:N`` every (m1/n1, m2/n2) with 1 <= m_k <= n_k <= N, deduplicated (1/2 = 2/4).
* ``bilinear:N`` the same set as ``fractional:N``, applied by bilinear interpolation.
* ``consistency:R`` random shifts: integer dy, dx uniform in {-R..R}; fractional uniform in [-R, R].
* ``crop:K`` the crop window moves k = 0..K pixels right and down over the larger image.
* ``curve:N`` sub-pixel shifts (t, t), t = k/N, k = 0..N, for the logit-change curve.
* ``equivariance:DYxDX,...`` the shifts of the per-stage equivariance diff (fractions allowed: 1/3x2/3).

Presets: ``default`` (modest, for CPUs) and ``paper`` (the paper's table, done right: integer
0..31, half 0..31, fractional N = 12). Tokens override the preset they follow.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

__all__ = [
    "ShiftGrid", "GridSpec", "integer_grid", "half_grid", "fractional_grid", "PRESETS", "parse_grid_spec",
    "GridSpecError",
]


class GridSpecError(ValueError):
    """A ``--grid`` token that cannot be parsed; the message names the accepted forms."""


Shift = tuple[float, float]


@dataclass(frozen=True)
class ShiftGrid:
    """A named, finite set of shifts and the spec token that rebuilds it."""

    kind: str
    spec: str
    shifts: tuple[Shift, ...]
    definition: str

    def __len__(self) -> int:
        return len(self.shifts)

    def __iter__(self):
        return iter(self.shifts)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "count": len(self.shifts), "definition": self.definition}


def _check_range(lo: int, hi: int) -> None:
    if lo > hi:
        raise GridSpecError(f"empty shift range {lo}..{hi}: LO must not exceed HI")


def integer_grid(lo: int, hi: int) -> ShiftGrid:
    """{(dy, dx) | lo <= dy, dx <= hi}, integers, axis-aligned shifts included; (hi - lo + 1)^2 shifts."""
    _check_range(lo, hi)
    r = range(lo, hi + 1)
    return ShiftGrid("integer", f"integer:{lo}..{hi}", tuple((float(i), float(j)) for i in r for j in r),
                     f"every integer (dy, dx) with {lo} <= dy, dx <= {hi}")


def half_grid(lo: int, hi: int) -> ShiftGrid:
    """{(i + a, j + b) | lo <= i, j <= hi, a, b in {0, 0.5}}: 4 (hi - lo + 1)^2 shifts."""
    _check_range(lo, hi)
    r = range(lo, hi + 1)
    offsets = (0.0, 0.5)
    shifts = tuple((i + a, j + b) for i in r for a in offsets for j in r for b in offsets)
    return ShiftGrid("half", f"half:{lo}..{hi}", shifts,
                     f"every integer shift in {lo}..{hi} plus (0.5, 0), (0, 0.5), (0.5, 0.5)")


def _fractions(n: int) -> list[Fraction]:
    if n < 1:
        raise GridSpecError(f"fractional grid needs N >= 1, got {n}")
    return sorted({Fraction(m, d) for d in range(1, n + 1) for m in range(1, d + 1)})


def fractional_grid(n: int, kind: str = "fractional") -> ShiftGrid:
    """{(m1/n1, m2/n2) | 1 <= m_k <= n_k <= N}, deduplicated: (number of distinct fractions)^2 shifts."""
    fr = _fractions(n)
    return ShiftGrid(kind, f"{kind}:{n}", tuple((float(a), float(b)) for a in fr for b in fr),
                     f"every (m1/n1, m2/n2) with 1 <= m <= n <= {n}, deduplicated"
                     + (", by bilinear interpolation of the raw image" if kind == "bilinear" else ""))


@dataclass
class GridSpec:
    """Every shift set an evaluation uses; ``tokens()`` is a spec that rebuilds it."""

    integer: ShiftGrid = field(default_factory=lambda: integer_grid(0, 3))
    half: ShiftGrid = field(default_factory=lambda: half_grid(0, 3))
    fractional: ShiftGrid = field(default_factory=lambda: fractional_grid(4))
    bilinear: ShiftGrid = field(default_factory=lambda: fractional_grid(4, "bilinear"))
    consistency: int = 32
    crop: int = 8
    curve: int = 8
    equivariance: tuple[Shift, ...] = ((1.0, 1.0), (0.5, 0.5))

    def tokens(self) -> list[str]:
        eq = ",".join(f"{_fmt(a)}x{_fmt(b)}" for a, b in self.equivariance)
        return [self.integer.spec, self.half.spec, self.fractional.spec, self.bilinear.spec,
                f"consistency:{self.consistency}", f"crop:{self.crop}", f"curve:{self.curve}", f"equivariance:{eq}"]

    def curve_shifts(self) -> list[float]:
        """t = k/N, k = 0..N: the sub-pixel shifts (t, t) of the logit-change curve."""
        return [k / self.curve for k in range(self.curve + 1)]

    def to_dict(self) -> dict:
        return {
            "integer": self.integer.to_dict(), "half": self.half.to_dict(),
            "fractional": self.fractional.to_dict(), "bilinear": self.bilinear.to_dict(),
            "consistency": {"spec": f"consistency:{self.consistency}", "max_shift": self.consistency,
                            "definition": f"two random shifts per image: integer dy, dx uniform in "
                                          f"-{self.consistency}..{self.consistency}; fractional uniform "
                                          f"in [-{self.consistency}, {self.consistency}]"},
            "crop": {"spec": f"crop:{self.crop}", "max_shift": self.crop,
                     "definition": f"crop window moved k = 0..{self.crop} px right and down, no wrap-around"},
            "curve": {"spec": f"curve:{self.curve}", "shifts": self.curve_shifts()},
            "equivariance": {"spec": self.tokens()[-1], "shifts": [list(s) for s in self.equivariance]},
        }


def _fmt(v: float) -> str:
    f = Fraction(v).limit_denominator(1000)
    return str(f) if abs(float(f) - v) < 1e-12 else repr(v)


PRESETS = {
    "default": [],
    "paper": ["integer:0..31", "half:0..31", "fractional:12", "bilinear:12", "consistency:32"],
}

_USAGE = ("use integer:LO..HI, half:LO..HI, fractional:N, bilinear:N, consistency:R, crop:K, curve:N, "
          "equivariance:DYxDX[,DYxDX...] or a preset (default, paper)")


def _int(value: str, token: str, minimum: int | None = None) -> int:
    try:
        v = int(value)
    except ValueError:
        raise GridSpecError(f"bad grid spec '{token}': '{value}' is not an integer; {_USAGE}") from None
    if minimum is not None and v < minimum:
        raise GridSpecError(f"bad grid spec '{token}': needs a value >= {minimum}; {_USAGE}")
    return v


def _range(value: str, token: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", value)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
    else:
        lo, hi = 0, _int(value, token, 0)
    if lo > hi:
        raise GridSpecError(f"bad grid spec '{token}': empty range {lo}..{hi}; fix: LO <= HI, e.g. integer:0..3")
    return lo, hi


def _number(text: str, token: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise GridSpecError(f"bad grid spec '{token}': '{text}' is not a number or fraction; {_USAGE}") from None


def _split_tokens(spec: str | Iterable[str]) -> list[str]:
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [t for p in parts for t in re.split(r"[\s;]+", p) if t]


def parse_grid_spec(spec: str | Sequence[str] | None = None) -> GridSpec:
    """Parse a grid spec (tokens separated by spaces or ';', or a list of them) into a ``GridSpec``."""
    grids = GridSpec()
    for token in _split_tokens(spec or []):
        if token in PRESETS:
            if token == "default":
                grids = GridSpec()
            else:
                for t in PRESETS[token]:
                    _apply(grids, t)
            continue
        _apply(grids, token)
    return grids


def _apply(grids: GridSpec, token: str) -> None:
    kind, sep, value = token.partition(":")
    kind = kind.strip().lower()
    if not sep or not value.strip():
        raise GridSpecError(f"unknown grid spec '{token}': {_USAGE}")
    if kind == "integer":
        grids.integer = integer_grid(*_range(value, token))
    elif kind == "half":
        grids.half = half_grid(*_range(value, token))
    elif kind in ("fractional", "bilinear"):
        setattr(grids, kind, fractional_grid(_int(value, token, 1), kind))
    elif kind == "consistency":
        grids.consistency = _int(value, token, 0)
    elif kind == "crop":
        grids.crop = _int(value, token, 0)
    elif kind == "curve":
        grids.curve = _int(value, token, 1)
    elif kind == "equivariance":
        shifts = []
        for pair in value.split(","):
            dy, x, dx = pair.strip().partition("x")
            if not x:
                raise GridSpecError(f"bad grid spec '{token}': '{pair}' is not DYxDX (e.g. 0.5x0.5, 1/3x2/3)")
            shifts.append((_number(dy, token), _number(dx, token)))
        grids.equivariance = tuple(shifts)
    else:
        raise GridSpecError(f"unknown grid kind '{kind}' in '{token}': {_USAGE}")
