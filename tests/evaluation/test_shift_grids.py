from fractions import Fraction
from math import gcd

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert.evaluation.shift_grids import (
    GridSpecError,
    fractional_grid,
    half_grid,
    integer_grid,
    parse_grid_spec,
)


def _totient_sum(n):
    """Number of distinct fractions m/k in (0, 1] with k <= n."""
    return sum(1 for k in range(1, n + 1) for m in range(1, k + 1) if gcd(m, k) == 1)


def test_integer_grid_includes_axis_aligned_shifts():
    g = integer_grid(0, 3)
    assert len(g) == 16 and len(set(g)) == 16
    # the official evaluation skips every shift with a zero component; these must be here
    for s in [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 3.0), (3.0, 0.0)]:
        assert s in g.shifts
    assert set(integer_grid(-1, 1)) == {(float(i), float(j)) for i in (-1, 0, 1) for j in (-1, 0, 1)}


def test_half_grid_is_integer_range_plus_half_offsets():
    g = half_grid(0, 1)
    assert set(g) == {(a, b) for a in (0, 0.5, 1, 1.5) for b in (0, 0.5, 1, 1.5)}
    assert {(0.5, 0.0), (0.0, 0.5), (0.5, 0.5)} <= set(g)
    assert set(integer_grid(0, 1)) <= set(g)
    assert len(half_grid(0, 31)) == 4 * 32 * 32


def test_fractional_grid_is_deduplicated():
    g = fractional_grid(4)
    values = sorted({a for a, _ in g})
    assert values == [0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0]
    assert len(g) == 36 and len(set(g)) == 36
    paper = fractional_grid(12)
    assert len(paper) == _totient_sum(12) ** 2 == 46 ** 2
    assert (1 / 12, 11 / 12) in paper.shifts and (0.5, 1 / 3) in paper.shifts
    assert all(0 < a <= 1 and 0 < b <= 1 for a, b in paper)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 16))
def test_fractional_grid_is_every_m_over_n(n):
    g = fractional_grid(n)
    want = {Fraction(m, k) for k in range(1, n + 1) for m in range(1, k + 1)}
    got = {Fraction(a).limit_denominator(n) for a, _ in g}
    assert got == want
    assert len(g) == len(want) ** 2


@settings(max_examples=30, deadline=None)
@given(st.integers(-5, 5), st.integers(0, 5))
def test_integer_grid_sizes(lo, width):
    g = integer_grid(lo, lo + width)
    assert len(g) == (width + 1) ** 2
    assert min(a for a, _ in g) == lo and max(b for _, b in g) == lo + width


def test_parse_presets_and_overrides():
    d = parse_grid_spec(None)
    assert (d.integer.spec, d.half.spec, d.fractional.spec) == ("integer:0..3", "half:0..3", "fractional:4")
    p = parse_grid_spec("paper")
    assert (len(p.integer), len(p.half), len(p.fractional)) == (1024, 4096, 2116)
    assert p.consistency == 32
    g = parse_grid_spec(["paper", "integer:-2..2 fractional:2", "crop:3;curve:4", "equivariance:1/3x2/3,1x0"])
    assert len(g.integer) == 25 and len(g.fractional) == 4 and len(g.half) == 4096
    assert g.crop == 3 and g.curve_shifts() == [0, 0.25, 0.5, 0.75, 1.0]
    assert g.equivariance == ((1 / 3, 2 / 3), (1.0, 0.0))
    assert parse_grid_spec("integer:5").integer.spec == "integer:0..5"
    # the reported spec rebuilds the same grids
    again = parse_grid_spec(g.tokens())
    assert again.tokens() == g.tokens() and again.integer.shifts == g.integer.shifts
    assert g.to_dict()["fractional"]["count"] == 4


@pytest.mark.parametrize("spec", ["foo", "integer", "integer:3..1", "integer:a", "fractional:0", "crop:-1",
                                  "equivariance:1,2", "equivariance:1xq", "wobble:3"])
def test_bad_specs_say_what_is_accepted(spec):
    with pytest.raises(GridSpecError) as exc:
        parse_grid_spec(spec)
    msg = str(exc.value)
    assert "\n" not in msg and spec.split(":")[0] in msg
