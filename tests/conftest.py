import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Random, non-trivial weights: every parameter perturbed (layer scales ~ 1, norms ~ 1 +- 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("gamma") and p.ndim <= 1:
                p.copy_(0.5 + 0.1 * noise)
            elif p.ndim <= 1 and ("norm" in name or "bn" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim <= 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(scale * noise / fan_in ** 0.5)
    return model


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
