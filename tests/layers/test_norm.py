"""The alias-free LayerNorm (afconvert.layers.norm): the paper's formula (a per-pixel channel mean, one standard
deviation per sample over C, H, W), exactly equivariant where the per-pixel LayerNorm is not, with the source's
weights as its only state."""
import pytest
import torch
import torch.nn as nn
from conftest import LAYER_SHIFTS, LAYER_SIZES, band_limited_map, equivariance_error

from afconvert.layers.norm import AliasFreeLayerNorm


@pytest.mark.parametrize("size", LAYER_SIZES)
def test_alias_free_layernorm(size):
    ln = nn.LayerNorm(5, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    af = AliasFreeLayerNorm.from_layernorm(ln, channel_dim=1, spatial_dims=(2, 3))
    x = band_limited_map((2, 5, *size))
    # the paper's formula, written out
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean((1, 2, 3), keepdim=True)
    ref = ln.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + ln.bias[:, None, None]
    torch.testing.assert_close(af(x), ref)
    per_pixel = lambda t: ln(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731
    for shift in LAYER_SHIFTS[1:]:
        assert equivariance_error(af, x, *shift) < 1e-10
        assert equivariance_error(per_pixel, x, *shift) > 1e-3
    assert set(af.state_dict()) == {"weight", "bias"}
