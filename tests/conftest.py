import os
from pathlib import Path

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


# -- layers (tests/layers/): random band-limited maps, and how far a layer is from commuting with a shift ----------

LAYER_SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75)]
LAYER_SIZES = [(8, 8), (12, 10), (9, 7)]
UPSAMPLING_SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, -2 / 3), (2.25, 1.5)]   # transposed convs and IdealResize


def band_limited_map(shape, seed=0, dtype=torch.float64):
    """Random values of ``shape`` (drawn in float64, then cast to ``dtype``) with the Nyquist bins zeroed."""
    from afconvert.layers.spectral import zero_nyquist
    g = torch.Generator().manual_seed(seed)
    return zero_nyquist(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@torch.no_grad()
def equivariance_error(layer, x, dy, dx, out_scale=1.0, dims=(-2, -1)):
    """The relative change between ``layer`` of the shifted ``x`` and its output shifted by ``out_scale`` times
    the shift (``out_scale``: the output's rate over the input's)."""
    from afconvert.converter.certify import relative_change
    from afconvert.layers.spectral import fractional_shift
    lhs = layer(fractional_shift(x, dy, dx, dims))
    rhs = fractional_shift(layer(x), dy * out_scale, dx * out_scale, dims)
    return relative_change(lhs, rhs)


# -- whole models (tests/converter/test_convert.py, tests/rules/): the shifts their logits are checked under -------

INTEGER = [(1, 0), (0, 1), (3, -2), (5, 7)]
FRACTIONAL = [(0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75)]


# -- evaluation (tests/evaluation/, tests/cli/test_eval.py, tests/rules/test_peer_recipes.py): photos, models ------

def photo(name):
    """One of scikit-image's sample photos (the test is skipped without it), as an RGB image."""
    skimage_data = pytest.importorskip("skimage.data")      # the demo extra
    from PIL import Image
    a = getattr(skimage_data, name)()
    return Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])


def image_folder(root: Path, labels: dict[str, int]) -> Path:
    """An ImageFolder: root/<class index>/<photo>.png."""
    for name, label in labels.items():
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        photo(name).save(root / str(label) / f"{name}.png")
    return root


class Constant(torch.nn.Module):
    """Always predicts class ``c`` (of ``n``)."""

    def __init__(self, c, n=5):
        super().__init__()
        self.c, self.n, self.num_classes = c, n, n
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n, dtype=x.dtype) + self.w
        out[:, self.c] = 1
        return out


# -- fine-tuning (tests/train/test_finetune.py, tests/cli/test_finetune.py) ---------------------------------------

@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    """An ImageFolder of 3 classes, 4 random 48 x 40 RGB images each."""
    from PIL import Image
    root = tmp_path_factory.mktemp("ft") / "data"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / str(c) / f"{i}.png")
    return root


# -- export (tests/test_export.py, tests/cli/test_export.py) ------------------------------------------------------

@pytest.fixture
def onnx_tools():
    """Skips the test where the ONNX export and runtime packages are not installed."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
