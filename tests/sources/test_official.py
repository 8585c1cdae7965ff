"""Paper fidelity: timm ConvNeXt + afc-paper computes the official ConvNeXt-AFC's function.

The reference (tests/data/official_convnext_afc_tiny.pt, see tests/data/README.md) holds an
official training checkpoint of a tiny ConvNeXt-AFC (random non-trivial weights) and the logits
the official code computed for fixed inputs at 96 and 128 px.
"""
from pathlib import Path

import pytest
import torch

from afconvert.converter.certify import relative_change
import afconvert
from afconvert.sources import official_afc
from afconvert.sources.models import ModelSourceError, read_state_dict

DATA = Path(__file__).parent.parent / "data" / "official_convnext_afc_tiny.pt"


@pytest.fixture(scope="module")
def reference():
    return read_state_dict(DATA)["reference"]


@pytest.fixture(scope="module")
def built():
    return afconvert.build("convnext_tiny", weights=DATA, input_size=(96, 96))


def test_plain_weights_only_load_refuses_the_namespace_and_ours_allows_only_it():
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(DATA, weights_only=True)
    with official_afc.safe_globals():
        ckpt = torch.load(DATA, weights_only=True)
    assert official_afc.is_official_checkpoint(ckpt) and "optimizer" in ckpt and "args" in ckpt


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("size", [96, 128])
def test_same_function_as_official(built, reference, dtype, tol, size):
    model = built.converted.to(dtype).eval()
    with torch.no_grad():
        y = model(reference["inputs"][size].to(dtype))
    ref = reference["logits_float64"][size].to(dtype)
    assert relative_change(y, ref) < tol


def test_official_checkpoint_is_recognised_and_configured(built):
    assert built.recipe == "afc-paper"
    assert built.converted.afconvert_report.verdict.value == "exact"
    assert any("official AFC checkpoint recognised" in n for n in built.notes)
    cfg = official_afc.architecture(official_afc.official_state_dict(read_state_dict(DATA)))
    assert cfg["depths"] == (1, 1, 1, 1) and cfg["dims"] == (8, 16, 32, 64)


def test_runs_where_official_code_fails(built):
    """The official model fails at 64 px (padding 3 on a 2x2 map) and on non-square inputs."""
    model = built.converted.float()
    for size in [(64, 64), (96, 128), (80, 72)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)


def test_sensitive_to_a_wrong_convention(built, reference):
    """The comparison can fail: the 'afc' recipe (no stem activation, source padding) differs."""
    wrong = afconvert.convert(built.source, "afc", input_size=(96, 96))
    mapped = official_afc.to_converted_timm(official_afc.official_state_dict(read_state_dict(DATA)))
    mapped = {k: v for k, v in mapped.items() if ".pre_down." not in k}
    wrong.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        y = wrong.double()(reference["inputs"][96])
    ref = reference["logits_float64"][96]
    assert relative_change(y, ref) > 1e-2


def test_wrong_model_name_for_official_checkpoint():
    with pytest.raises(ModelSourceError, match="official Alias-Free ConvNeXt checkpoint.*convnext"):
        afconvert.build("resnet18", weights=DATA)
