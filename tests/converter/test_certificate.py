"""A certificate that cannot lie: fixed-size grids keep their positions (adaptive pools, flattened heads),
rules read their ops' arguments, and a float64 measurement vetoes an analysis that is wrong. Each check is
shown failing where it should: the uncertified models move, the wrong rule is caught."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.layers import SelectAdaptivePool2d

import afconvert
from afconvert.converter.certify import random_input, relative_logit_change
from afconvert.converter.layout import infer_layouts
from afconvert.converter.report import NotAliasFreeError
from afconvert.converter.rule import Judgement, Rule, Verdict
from afconvert.converter.tracing import trace
from afconvert.layers.pool import BroadcastGlobalPool2d
from conftest import FRACTIONAL, INTEGER

SIZE = (32, 32)


class Head(nn.Module):
    """Conv -> ReLU -> ``pool`` -> flatten (by ``how``) -> Linear: the issue's ten lines."""

    def __init__(self, pool: nn.Module, cells: int, how: str):
        super().__init__()
        self.conv, self.pool, self.how = nn.Conv2d(3, 8, 3, padding=1), pool, how
        self.fc, self.flat = nn.Linear(8 * cells, 5), nn.Flatten()

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        if self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "nn.Flatten":
            x = self.flat(x)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


class FunctionalPool(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.size)


def _moves(model, size=SIZE, shifts=INTEGER + FRACTIONAL) -> float:
    x = random_input(2, 3, size, torch.float64)
    return max(relative_logit_change(model.double().eval(), x, shifts).values())


GRIDS = [(nn.AdaptiveAvgPool2d(2), 4), (nn.AdaptiveAvgPool2d((2, 3)), 6), (FunctionalPool(3), 9),
         (nn.AdaptiveMaxPool2d(2), 4)]


@pytest.mark.parametrize("how", ["torch.flatten", "nn.Flatten", "view", "reshape"])
@pytest.mark.parametrize("grid", range(len(GRIDS)), ids=["avg2", "avg2x3", "F.avg3", "max2"])
def test_pool_to_a_grid_then_flatten_is_not_certified(grid, how):
    torch.manual_seed(0)
    pool, cells = GRIDS[grid]
    model = afconvert.convert(Head(pool, cells, how), input_size=SIZE)
    report = model.afconvert_report
    assert not report.certified and report.verdict is Verdict.NOT
    reasons = {f.op: f.reason for f in report.offenders}
    pool_reason = next(r for op, r in reasons.items() if "daptive" in op)
    assert "grid" in pool_reason and "fractional stride" in pool_reason
    assert any("flattened map in a fully connected head" in r for r in reasons.values()), reasons
    assert "Linear" in reasons
    assert _moves(model) > 1e-3      # what the verdict says: the converted model does move


def test_global_pool_then_flatten_is_certified_and_invariant():
    torch.manual_seed(0)
    model = afconvert.convert(Head(nn.AdaptiveAvgPool2d(1), 1, "view"), input_size=SIZE)
    assert model.afconvert_report.certified
    assert _moves(model) < 1e-10 and _moves(model, (27, 33)) < 1e-10


def test_head_option_is_exact_and_sums_the_linear_over_positions():
    torch.manual_seed(0)
    source = Head(nn.AdaptiveAvgPool2d(2), 4, "torch.flatten").eval()
    model = afconvert.convert(source, input_size=SIZE, options={"pool": {"head": "global"}})
    report = model.afconvert_report
    assert isinstance(model.pool, BroadcastGlobalPool2d) and report.certified
    assert "summed over the 4 positions" in next(f.reason for f in report.findings if f.node == "pool")
    assert _moves(model) < 1e-10 and _moves(model, (27, 33)) < 1e-10
    # equal to a Linear over the global average whose weight is the original's summed over the 2 x 2 cells
    x, seen = random_input(2, 3, SIZE, torch.float64), []
    model.pool.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    y = model(x)
    w = source.fc.weight.double().view(5, 8, 4).sum(-1)
    assert torch.allclose(y, seen[0].mean((2, 3)) @ w.T + source.fc.bias.double(), atol=1e-12)


def _narrow(model: nn.Module, features: int) -> nn.Module:
    """A torchvision model with its classifier narrowed (the 100M-weight Linear is not what is tested)."""
    model.classifier = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 10))
    return model.eval()


# sizes where the last map is 3 x 3 (a 1 x 1 map pooled to a grid is constant, and so is a 2 x 2 band-limited one)
@pytest.mark.parametrize("name,size,features", [("vgg11_bn", (96, 96), 512 * 49), ("alexnet", (128, 128), 256 * 36)])
def test_vgg_and_alexnet_heads(name, size, features):
    torch.manual_seed(0)
    source = _narrow(getattr(torchvision.models, name)(weights=None), features)
    plain = afconvert.convert(source, input_size=size)
    assert not plain.afconvert_report.certified
    assert "avgpool" in [f.node for f in plain.afconvert_report.offenders]
    assert "pool.head = 'global'" in plain.afconvert_report.verdict_text       # the fix is named
    head = afconvert.convert(source, input_size=size, options={"pool": {"head": "global"}})
    assert head.afconvert_report.certified
    shifts = [(3, -2), (0.5, 0.5), (1 / 3, 2 / 3)]
    assert _moves(head, size, shifts) < 1e-10 and _moves(plain, size, shifts) > 1e-6


class Wrong(nn.Module):
    """A zero-padded blur: not shift-equivariant; a deliberately wrong rule calls it exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.conv(x)


WRONG_RULE = Rule(name="wrong", family="deliberately-wrong", targets=(Wrong,),
                  judge=lambda site, options: Judgement(Verdict.EXACT, "deliberately wrong"))


def _wrong_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1), Wrong(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_measurement_vetoes_a_wrong_rule():
    torch.manual_seed(0)
    model = afconvert.convert(_wrong_model(), input_size=SIZE, rules=[WRONG_RULE], leaf_modules=[Wrong])
    report = model.afconvert_report
    assert report.graph_verdict is Verdict.EXACT           # the analysis is fooled ...
    assert report.verdict is Verdict.CONTRADICTED and not report.certified   # ... the measurement is not
    m = report.measurement
    assert not m["agrees"] and m["worst"] > 1e-4 and m["dtype"] == "float64" and m["shift"] in report.verdict_text
    assert "NOT certified" in report.verdict_text and "please report" in report.verdict_text
    assert "measurement (float64" in report.summary()
    with pytest.raises(NotAliasFreeError, match="measurement disagrees"):
        afconvert.convert(_wrong_model(), input_size=SIZE, rules=[WRONG_RULE], leaf_modules=[Wrong], strict=True)
    audited = afconvert.audit(model, input_size=SIZE, rules=[WRONG_RULE], leaf_modules=[Wrong])
    assert audited.verdict is Verdict.CONTRADICTED


def test_unmeasured_exact_analysis_is_not_called_certified():
    model = afconvert.convert(_wrong_model()[:1], input_size=SIZE, check_numerics=False)
    report = model.afconvert_report
    assert report.verdict is Verdict.EXACT and not report.certified and "not measured" in report.verdict_text


def _layouts(model, size=SIZE):
    gm = trace(model.eval())
    return gm, infer_layouts(gm, size)[0]


def test_grid_dims_keep_their_roles_and_a_broadcast_is_constant():
    for pool, roles in [(nn.AdaptiveAvgPool2d(2), ("", "", "H", "W")), (BroadcastGlobalPool2d(2), ("", "", "", "")),
                        (nn.AdaptiveAvgPool2d(1), ("", "", "", ""))]:
        gm, lay = _layouts(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool, nn.Flatten()))
        assert lay["_1"].roles == roles, pool
        assert lay["_2"].mixed == any(roles)


class Windows(nn.Module):
    """Splits H and W into 4 x 4 windows (a window attention's partition)."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, c, h // 4, 4, w // 4, 4).mean((3, 5))


def test_window_split_is_a_sampling_and_a_resized_pattern_is_fixed():
    gm, lay = _layouts(Windows())
    view = next(n.name for n in gm.graph.nodes if n.target == "view")
    assert lay[view].roles == ("", "", "H", "H", "W", "W") and lay[view].mixed   # the window index holds rows
    report = afconvert.audit(nn.Sequential(Windows(), nn.AdaptiveAvgPool2d(1)), input_size=SIZE, check=False)
    assert report.verdict is Verdict.NOT

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 4, 4))

        def forward(self, x):
            return x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear")
    gm, lay = _layouts(Positional())
    interp = next(n.name for n in gm.graph.nodes if n.target is F.interpolate)
    assert lay[interp].fixed and lay[interp].is_spatial and not lay["x"].fixed
    report = afconvert.audit(nn.Sequential(Positional(), nn.AdaptiveAvgPool2d(1)), input_size=SIZE, check=False)
    assert any("does not move with the input" in f.reason for f in report.offenders)


class Cat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.cat([x, x], dim=self.dim)


@pytest.mark.parametrize("layer,exact", [
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), True),
    (nn.Conv2d(3, 3, 3, padding=2, padding_mode="circular"), False),    # longer than the map's period
    (nn.Conv2d(3, 3, 1, padding=1), False),                             # a zero border around a 1x1 conv
    (nn.Conv2d(3, 3, 4, padding="same", padding_mode="circular"), True),
    (nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3, padding_mode="circular"), True),
    (Cat(1), True), (Cat(3), False),
    (nn.BatchNorm2d(3), True),
    (nn.AdaptiveAvgPool2d((1, None)), True), (nn.AdaptiveAvgPool2d((2, None)), False),
], ids=["circ", "circ-pad2", "1x1-zero-pad", "k4-same", "dilated-grouped", "cat-C", "cat-W", "bn", "mean-H",
        "pool-H-to-2"])
def test_exact_rules_read_their_arguments(layer, exact):
    model = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1)).eval()
    report = afconvert.audit(model, input_size=(16, 16), check=False)
    assert (report.verdict is Verdict.EXACT) == exact, report.verdict_text
    if exact:       # what is judged exact is: float64, integer and fractional shifts
        assert _moves(model, (16, 16)) < 1e-10


class ChannelsLastNorm(nn.Module):
    """A BatchNorm2d fed a channels-last tensor: its 'channels' are rows of the map."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn(x.permute(0, 2, 3, 1)).mean((1, 2))


def test_norm_over_a_spatial_dim_and_timm_select_pool():
    torch.manual_seed(0)
    report = afconvert.audit(ChannelsLastNorm().eval(), input_size=(16, 16), check=False)
    assert any("channel dim (dim 1) is spatial" in f.reason for f in report.offenders)
    for pool_type, verdict in [("avg", Verdict.EXACT), ("max", Verdict.INTEGER)]:
        model = nn.Sequential(SelectAdaptivePool2d(pool_type=pool_type, flatten=True), nn.Linear(3, 2)).eval()
        assert afconvert.audit(model, input_size=(16, 16), check=False).verdict is verdict
    grid = nn.Sequential(SelectAdaptivePool2d(output_size=2, pool_type="avg", flatten=True), nn.Linear(12, 2)).eval()
    assert afconvert.audit(grid, input_size=(16, 16), check=False).verdict is Verdict.NOT


def test_avg_pool_divisor_override_is_kept():
    torch.manual_seed(0)
    source = nn.Sequential(nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool2d(1)).eval()
    model = afconvert.convert(source, input_size=(16, 16))
    x = torch.ones(1, 3, 16, 16)
    assert torch.allclose(model(x), source(x)) and float(source(x).mean()) == pytest.approx(4 / 3)
