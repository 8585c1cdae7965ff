"""Any output structure: backbones (timm ``features_only``), tuple and dict outputs, and decoders that
up-sample (bilinear, to a computed size, transposed convs) convert; each output gets its own certificate
(invariant, or equivariant with its stride) and the empirical check compares each output with its own
shift. The unconverted models fail the same check; a flattened map is reported, never certified."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import afconvert
from afconvert.converter.certify import output_leaves, shift_check

SHIFTS = ((1, 0), (0, 3), (0.5, 0.5), (1 / 3, -2 / 3), (2.25, 1.75))


def _errors(model, size, dtype=torch.float64):
    """Per output: the worst relative change against its own expected shift, over SHIFTS."""
    check = shift_check({"m": model.to(dtype)}, size, in_chans=3, shifts=SHIFTS, dtype=dtype)
    per = check.get("outputs", {}).get("m") or {"output": check["models"]["m"]}
    return {k: max(v.values()) for k, v in per.items()}


def _certified(model, size):
    report = afconvert.audit(model, input_size=size, check=False)
    return report, {o.name: o for o in report.outputs}


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0"])
@pytest.mark.parametrize("size", [(40, 36), (33, 45)], ids=["even", "odd"])
def test_timm_features_only_every_output_equivariant(name, size):
    torch.manual_seed(0)
    source = timm.create_model(name, features_only=True, pretrained=False).eval()
    converted = afconvert.convert(source, input_size=size)
    report, outs = _certified(converted, size)
    assert report.verdict.value == "exact" and len(outs) == len(source.feature_info)
    for o, reduction in zip(report.outputs, source.feature_info.reduction()):
        assert o.kind == "equivariant" and o.verdict.value == "exact"
        assert [float(eval(r)) for r in o.stride] == pytest.approx([size[0] / o.shape[2], size[1] / o.shape[3]])
        if size[0] % reduction == 0:
            assert o.stride[0] == str(reduction)
    errors = _errors(converted, size)
    assert set(errors) == set(outs) and max(errors.values()) < 1e-10, errors
    source_errors = _errors(source, size)
    assert min(source_errors.values()) > 0.1, source_errors
    assert afconvert.audit(source, input_size=size, check=False).verdict.value != "exact"


class Backbone(nn.Module):
    """Two stride-2 stages: features at strides 2 and 4."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        f1 = self.s1(x)
        return f1, self.s2(f1)


class TupleOut(Backbone):
    def forward(self, x):
        f1, f2 = super().forward(x)
        return f1, (f2, f2.mean((2, 3)))            # nested: a map and pooled features


class DictOut(Backbone):
    def forward(self, x):
        f1, f2 = super().forward(x)
        return {"stride2": f1, "stride4": f2, "logits": f2.mean((2, 3))}


class Decoder(nn.Module):
    """A U-Net-like head: the stride-4 map up-sampled to the stride-2 map, added, then back to the input."""

    def __init__(self, up: str):
        super().__init__()
        self.backbone, self.up = Backbone(), up
        self.lateral = nn.Conv2d(8, 16, 1)
        self.deconv = nn.ConvTranspose2d(16, 16, 4, 2, 1) if up == "transposed" else None
        self.head = nn.ConvTranspose2d(16, 5, 2, 2) if up == "transposed" else nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x):
        f1, f2 = self.backbone(x)
        if self.up == "transposed":
            return self.head(self.deconv(f2) + self.lateral(f1))
        if self.up == "size":             # an FPN's: to the skip's size, computed in the graph
            y = F.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False) + self.lateral(f1)
            return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = F.interpolate(f2, scale_factor=2, mode="bilinear", align_corners=False) + self.lateral(f1)
        return nn.functional.interpolate(self.head(y), scale_factor=2.0, mode="nearest")


@pytest.mark.parametrize("model, size", [(TupleOut(), (24, 20)), (DictOut(), (24, 20)), (Decoder("bilinear"), (24, 20)),
                                         (Decoder("size"), (24, 20)), (Decoder("transposed"), (24, 20)),
                                         (Decoder("size"), (20, 28))],
                         ids=["tuple", "dict", "bilinear", "computed-size", "transposed", "computed-size-2"])
def test_structured_outputs_and_decoders(model, size):
    torch.manual_seed(0)
    from conftest import randomize_
    source = randomize_(model).eval()
    converted = afconvert.convert(source, input_size=size)
    report, outs = _certified(converted, size)
    assert report.verdict.value == "exact", report.summary()
    names = set(output_leaves(source(torch.zeros(1, 3, *size))))
    assert set(outs) == {n or "output" for n in names}
    for name, o in outs.items():
        assert o.kind == ("invariant" if len(o.shape) == 2 else "equivariant")
    if isinstance(model, Decoder):
        assert outs["output"].shape[2:] == size and outs["output"].stride == ("1", "1")
    errors = _errors(converted, size)
    assert max(errors.values()) < 1e-10, errors
    assert max(_errors(source, size).values()) > 0.1


def test_a_flattened_map_output_is_reported_never_certified():
    class Flat(Backbone):
        def forward(self, x):
            f1, f2 = super().forward(x)
            return f2.mean((2, 3)), f2.flatten(1)

    converted = afconvert.convert(randomize_flat := Flat().eval(), input_size=(16, 16))
    report, outs = _certified(converted, (16, 16))
    assert outs["0"].kind == "invariant" and outs["0"].verdict.value == "exact"
    assert outs["1"].kind == "flattened" and outs["1"].verdict.value != "exact"
    assert report.verdict.value != "exact" and "output 1 (a flattened map" in report.verdict_text
    assert "flattened" in report.summary() and randomize_flat is not None


def test_converted_decoder_rebuilds_from_its_plan():
    """The transposed conv and the resizes are rebuilt from plain data, as a checkpoint does."""
    from afconvert.sources.plan import apply_plan, module_plan
    torch.manual_seed(0)
    source = Decoder("transposed").eval()
    converted = afconvert.convert(source, input_size=(16, 16))
    rebuilt = apply_plan(Decoder("transposed").eval(), module_plan(converted, converted.afconvert_info.replaced))
    rebuilt.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(rebuilt(x), converted(x))


def test_features_only_checkpoint_loads(tmp_path):
    built = afconvert.build("resnet18", pretrained=False, features_only=True, out_indices=(1, 2), input_size=(32, 32))
    afconvert.save(built.converted, tmp_path / "backbone.pt")
    loaded = afconvert.load(tmp_path / "backbone.pt")
    x = torch.randn(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), built.converted(x))) and len(loaded(x)) == 2


def test_torchvision_feature_extractor_and_timm_intermediates():
    """torchvision's ``create_feature_extractor`` (a dict of maps and a pooled vector) and timm's
    ``forward_intermediates`` (a list of maps) convert, each output certified with its own kind."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    fe = create_feature_extractor(torchvision.models.resnet18().eval(), {"layer2": "c3", "avgpool": "pool"})
    converted = afconvert.convert(fe, input_size=(48, 40))
    _, outs = _certified(converted, (48, 40))
    assert outs["c3"].kind == "equivariant" and outs["c3"].stride == ("8", "8") and outs["pool"].kind == "invariant"
    assert max(_errors(converted, (48, 40)).values()) < 1e-10 and max(_errors(fe, (48, 40)).values()) > 0.1

    class Intermediates(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = timm.create_model("resnet18")

        def forward(self, x):
            return self.m.forward_intermediates(x, indices=2, intermediates_only=True)

    report, outs = _certified(afconvert.convert(Intermediates().eval(), input_size=(48, 40)), (48, 40))
    assert report.verdict.value == "exact" and [o.stride for o in report.outputs] == [("16", "40/3"), ("24", "20")]
