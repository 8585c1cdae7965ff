"""Each metric against values computed by hand on tiny models and inputs."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from conftest import randomize_

import afconvert
from afconvert.evaluation import metrics as M
from afconvert.evaluation.shift_grids import fractional_grid, half_grid, integer_grid
from afconvert.layers.spectral import fractional_shift, ideal_downsample, zero_nyquist

pytestmark = pytest.mark.usefixtures("one_thread")


def cos_images(phases, n=8):
    """x_i[r, c] = cos(2 pi (r - p_i) / n): one frequency below Nyquist, constant along columns."""
    r = torch.arange(n, dtype=torch.float64).view(1, 1, n, 1)
    p = torch.tensor(phases, dtype=torch.float64).view(-1, 1, 1, 1)
    return torch.cos(2 * math.pi * (r - p) / n).expand(-1, 1, n, n).contiguous()


class TopLeft(nn.Module):
    """logits = [x[0, 0], threshold]: class 0 iff the top-left pixel exceeds the threshold."""

    def __init__(self, threshold=0.1):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([v, torch.full_like(v, self.threshold)], 1)


class FlipAt(nn.Module):
    """Predicts class 0, except class 1 on exactly one image (``ref``)."""

    def __init__(self, ref):
        super().__init__()
        self.ref = ref

    def forward(self, x):
        hit = (x - self.ref).flatten(1).abs().amax(1) < 1e-6
        return torch.stack([(~hit).double(), hit.double()], 1)


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.images = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.inner(x)


# phases 0, -1, 1, 2 under a shift d: class 0 iff cos(2 pi (p + d) / 8) > 0.1
PHASES = [0, -1, 1, 2]
TARGET = torch.zeros(4, dtype=torch.long)


def test_accuracy_and_nonfinite_rows():
    x = cos_images(PHASES)
    logits = TopLeft()(x)
    assert M.topk_correct(logits, TARGET).tolist() == [True, True, True, False]   # cos(pi/2) = 0 < 0.1
    assert M.topk_correct(logits, TARGET, k=5).all()                               # k clamps to 2 classes
    logits[0, 1] = float("nan")
    logits[1, 0] = float("inf")
    assert M.predict(logits).tolist() == [-1, -1, 0, 1]
    assert M.topk_correct(logits, TARGET, 2).tolist() == [False, False, True, True]


def test_certified_hand_computed():
    x, model = cos_images(PHASES), TopLeft()
    cert = lambda grid, **kw: M.certified_correct(model, x, TARGET, grid, **kw).tolist()
    # integer 0..1: p = 1 fails at d = 1 (cos(pi/2)); p = 2 is already wrong
    assert cert(integer_grid(0, 1)) == [True, True, False, False]
    # integer 0..2: p = 0 fails at d = 2
    assert cert(integer_grid(0, 2)) == [False, True, False, False]
    # half 0..1: d in {0, .5, 1, 1.5}; p = 0 at 1.5: cos(3 pi / 8) = 0.38 > 0.1
    assert cert(half_grid(0, 1)) == [True, True, False, False]
    # fractional (0, 1]: p = -1 and 0 stay within pi/4 of 0
    assert cert(fractional_grid(6)) == [True, True, False, False]
    # integer -2..-1: p = 0 fails at d = -2, p = -1 at d = -2; p = 1 stays within pi/4
    assert cert(integer_grid(-2, -1)) == [False, False, True, False]


def test_certified_fails_on_the_one_shift_that_flips():
    g = torch.Generator().manual_seed(0)
    x0 = zero_nyquist(torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64))
    y = torch.zeros(1, dtype=torch.long)
    axis = FlipAt(torch.roll(x0, (1, 0), (2, 3)))
    assert not M.certified_correct(axis, x0, y, integer_grid(0, 1))     # (1, 0) is in the grid
    assert M.certified_correct(axis, x0, y, integer_grid(1, 1))         # the official grid: only (1, 1)
    assert M.certified_correct(axis, x0, y, half_grid(-1, -1))
    half = FlipAt(fractional_shift(x0, 0.5, 0.5))
    assert M.certified_correct(half, x0, y, integer_grid(0, 3))
    assert not M.certified_correct(half, x0, y, half_grid(0, 0))
    assert not M.certified_correct(half, x0, y, fractional_grid(2))
    assert M.certified_correct(half, x0, y, fractional_grid(1))
    third = FlipAt(fractional_shift(x0, 1 / 3, 2 / 3))
    assert M.certified_correct(third, x0, y, fractional_grid(2))
    assert not M.certified_correct(third, x0, y, fractional_grid(3))


def test_certified_shifts_the_band_limited_image_and_integer_grids_the_raw_one():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)    # with Nyquist energy
    y = torch.zeros(1, dtype=torch.long)
    model = FlipAt(zero_nyquist(raw))
    assert M.topk_correct(model(raw), y).item()                        # the raw image itself is fine
    assert M.certified_correct(model, raw, y, integer_grid(0, 0))      # integer shifts: of the raw image
    assert not M.certified_correct(model, raw, y, [(0, 0), (0, 0.5)])  # a half shift: of P(raw), for all


def test_certified_batches_shifts_and_skips_failed_images():
    x = cos_images(PHASES)
    model = Counting(TopLeft())
    M.certified_correct(model, x[:2], TARGET[:2], integer_grid(0, 3), chunk=32)
    assert (model.calls, model.images) == (2, 2 + 16 * 2)              # 16 shifts x 2 images in one call
    model = Counting(TopLeft())
    out = M.certified_correct(model, x, TARGET, integer_grid(0, 1), chunk=3)
    assert out.tolist() == [True, True, False, False]
    # plain (4 images), then the 3 correct ones: shift (0, 0) and (0, 1) pass, (1, 0) fails p = 1,
    # so (1, 1) only needs the 2 survivors: 4 + 3 + 3 + 3 + 2
    assert (model.calls, model.images) == (5, 15)
    small = M.certified_correct(TopLeft(), x, TARGET, integer_grid(0, 1), chunk=1)
    assert small.tolist() == out.tolist()


def test_nonfinite_predictions_are_wrong_and_never_consistent():
    class NaNFor(nn.Module):
        def forward(self, x):
            out = TopLeft()(x)
            return torch.where((x[:, 0, 0, 0] > 0.9).view(-1, 1), torch.full_like(out, float("nan")), out)
    x = cos_images(PHASES)
    assert M.certified_correct(NaNFor(), x, TARGET, integer_grid(0, 0)).tolist() == [False, True, True, False]
    same, _ = M.consistency_same(NaNFor(), x, max_shift=0)
    assert same.tolist() == [False, True, True, True]


class PhaseReader(nn.Module):
    """Class = floor(s mod 8), s = the row shift of cos(2 pi r / 8) read from the phase of its first bin."""

    def forward(self, x):
        ph = torch.angle(torch.fft.fft(x[:, 0, :, 0], dim=-1)[:, 1])
        s = torch.remainder(-ph * 8 / (2 * math.pi) + 1e-4, 8)
        return nn.functional.one_hot(s.floor().long(), 8).double()


@pytest.mark.parametrize("fractional", [False, True])
def test_consistency_draws_a_fresh_pair_of_shifts_per_image(fractional):
    x = cos_images([0] * 64)
    g = torch.Generator().manual_seed(3)
    same, shifts = M.consistency_same(PhaseReader(), x, max_shift=5, fractional=fractional, generator=g, chunk=16)
    dy = shifts[:, :, 0]
    assert len({tuple(r) for r in shifts.view(64, 4).tolist()}) > 32            # not one shift for the run
    assert (shifts.abs() <= 5).all() and (dy == dy.round()).all() != fractional
    want = torch.floor(torch.remainder(dy[:, 0] + 1e-4, 8)) == torch.floor(torch.remainder(dy[:, 1] + 1e-4, 8))
    assert same.tolist() == want.tolist()
    assert 0 < same.sum() < 64


def test_consistency_rate_matches_the_hand_computed_probability():
    # TopLeft on phase 0, integer shifts uniform in -4..4: class 0 iff d mod 8 in {7, 0, 1}
    # q = P(class 0) = #{-1, 0, 1} / 9 = 1/3;  P(same) = q^2 + (1 - q)^2 = 5/9
    x = cos_images([0] * 1500)
    same, _ = M.consistency_same(TopLeft(), x, 4, False, torch.Generator().manual_seed(0), 512)
    rate = 100 * float(same.float().mean())
    assert abs(rate - 100 * 5 / 9) < 3.5     # 1500 draws: standard error 1.3 points


def test_bilinear_shift_matches_linear_interpolation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 5, 6, generator=g, dtype=torch.float64)
    assert torch.equal(M.bilinear_shift(x, 2, -1), torch.roll(x, (2, -1), (2, 3)))
    half = M.bilinear_shift(x, 0, 0.5)
    assert torch.allclose(half, 0.5 * (x + torch.roll(x, 1, 3)))
    dy, dx = 1.25, -0.5
    y = M.bilinear_shift(x, dy, dx)
    for r in range(5):
        for c in range(6):
            ry, rx = r - dy, c - dx                          # y[n] = x(n - d), linear interpolation, circular
            y0, x0 = math.floor(ry), math.floor(rx)
            a, b = ry - y0, rx - x0
            v = sum(w * x[0, 0, (y0 + i) % 5, (x0 + j) % 6]
                    for i, wi in ((0, 1 - a), (1, a)) for j, wj in ((0, 1 - b), (1, b)) for w in [wi * wj])
            assert abs(float(y[0, 0, r, c] - v)) < 1e-12


def test_bilinear_certified_and_logit_change_hand_computed():
    x = cos_images([0])
    y = torch.zeros(1, dtype=torch.long)
    ts = [0.0, 0.25, 0.5, 1.0]
    diag = [(t, t) for t in ts]
    band = M.logit_change(TopLeft(), x, diag, "band_limited")[0]
    bil = M.logit_change(TopLeft(), x, diag, "bilinear")[0]
    norm = math.sqrt(1 + 0.1 ** 2)
    for i, t in enumerate(ts):
        assert abs(band[i].item() - abs(math.cos(math.pi * t / 4) - 1) / norm) < 1e-9
        assert abs(bil[i].item() - t * (1 - math.cos(math.pi / 4)) / norm) < 1e-9
    # bilinear at the top-left pixel: (1 - t) + t cos(pi/4) > 0.1 for every t: certified
    assert M.certified_correct(TopLeft(), x, y, fractional_grid(4), "bilinear").item()
    assert not M.certified_correct(TopLeft(0.8), x, y, fractional_grid(4), "bilinear").item()  # t = 1 gives 0.707
    nan = M.logit_change(lambda v: torch.full((v.shape[0], 2), float("nan")), x, diag)
    assert torch.isnan(nan).all()


class MaskStage(nn.Module):
    """A stage that multiplies by a fixed column mask [1, 2, 1, 2]: not shift-equivariant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64))

    def forward(self, x):
        return x * self.mask


class Net(nn.Module):
    def __init__(self, stage):
        super().__init__()
        self.stage = stage
        self.feature_info = [{"module": "stage", "num_chs": 1, "reduction": 1}]

    def forward(self, x):
        return self.stage(x).mean((2, 3))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_equivariance_diff_hand_computed():
    x = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    net = Net(MaskStage())
    assert M.stage_layers(net) == ["stage"]
    # shift (0, 1): y0 = mask, y1 = roll(mask) = [2, 1, 2, 1]: |y0 - y1| / max = 1/2 at every pixel
    d = M.equivariance_diff(net, x, [(0, 1)], eps=1e-6)
    assert torch.allclose(d["stage"], torch.full((2,), 1 / (2 + 1e-6), dtype=torch.float64))
    # shift (0, 2) leaves the mask in place: diff 0; the mean over both shifts is 1/4
    d = M.equivariance_diff(net, x, [(0, 1), (0, 2)], eps=0)
    assert torch.allclose(d["stage"], torch.full((2,), 0.25, dtype=torch.float64))


def test_equivariance_diff_rescales_the_shift_to_the_feature_map():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    ideal = M.equivariance_diff(Net(Lambda(lambda v: ideal_downsample(v, 2))), x, [(1, 1), (0.5, 1.5)])
    naive = M.equivariance_diff(Net(Lambda(lambda v: v[..., ::2, ::2])), x, [(1, 0)])
    assert ideal["stage"].max() < 1e-9          # features move by d / 2: exact
    assert naive["stage"].min() > 0.05          # plain sub-sampling aliases


def test_equivariance_of_a_converted_model_per_stage():
    src = randomize_(timm.create_model("convnext_atto", num_classes=4)).eval()
    af = afconvert.convert(src).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 64, 64, generator=g)
    names = [f"stages.{i}" for i in range(4)]
    assert M.stage_layers(src) == names
    d_src = M.equivariance_diff(src, x, [(1, 1), (0.5, 0.5)])
    d_af = M.equivariance_diff(af, x, [(1, 1), (0.5, 0.5)])
    assert list(d_af) == names
    assert max(v.item() for v in d_af.values()) < 1e-3
    assert min(v.item() for v in d_src.values()) > 1e-2


def test_crop_shift_hand_computed():
    assert M.crop_windows(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (0, 2)]
    e = torch.zeros(1, 1, 6, 6)
    e[0, 0, 0, 0] = e[0, 0, 0, 1] = e[0, 0, 2, 0] = 1.0     # window (t, l) correct iff e[t, l] > 0.5
    y = torch.zeros(1, dtype=torch.long)
    for chunk in (1, 64):
        out = M.crop_shift_correct(TopLeft(0.5), e, y, (4, 4), 2, chunk=chunk)
        assert out[0].tolist() == [[True, False, True], [True, True, False]]   # down k = 0..2, right k = 0..2
    with pytest.raises(ValueError, match="at least 7 x 7"):
        M.crop_shift_correct(TopLeft(0.5), e, y, (4, 4), 3)
