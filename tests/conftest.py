import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import numpy as np
import pytest
import torch

# one intra-op thread per pytest-xdist worker (two workers share two cores), else at most two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


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


def calibrate_norms_(model: torch.nn.Module, input_size=(64, 64), seed: int = 0, gain: float = 1.0,
                     batches: int = 2) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of ``batches`` batches of 4 random inputs (a
    data-dependent init), so random-weight networks have input-dependent logits, and multiply its scale by
    ``gain``."""
    from afconvert.converter.certify import random_input
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(random_input(4, 3, input_size, seed=seed + i))
    with torch.no_grad():
        for bn in bns:
            bn.momentum = 0.1
            if bn.weight is not None:
                bn.weight.mul_(gain)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_idx(path, array, gz=False, type_code=0x08):
    """An IDX file of ``array`` (the MNIST family's format), written by hand."""
    import gzip
    dtype = {0x08: ">u1", 0x0D: ">f4"}[type_code]
    raw = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + \
        np.asarray(array).astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def idx_folder(root, n=12, gz=True, seed=0, splits=("train", "t10k")):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in splits:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        labels[:10] = np.arange(10)
        ext = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", labels, gz)
        out[split] = (images, labels)
    return out



class Killed(BaseException):
    """What ``kill_after`` raises in-process: like a kill, nothing after it runs (not caught as an Exception)."""


def kill_after(step: int, hard: bool = True):
    """A training step hook that ends the process after update ``step``, as a kill would: ``os._exit(17)``
    (nothing after it is saved), or, with ``hard=False``, raising ``Killed`` so an in-process test goes on."""
    def hook(at: int) -> None:
        if at == step:
            if hard:
                os._exit(17)
            raise Killed(step)
    return hook
