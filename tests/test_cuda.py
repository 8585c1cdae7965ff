"""The CUDA path (skipped where there is no GPU, as in CI): the same maps and the same invariance as on
the CPU, FFT and matmul forms, float64 certificates, and mixed precision that stays finite."""
import copy

import pytest
import torch

import afconvert
from afconvert.converter.certify import random_input, relative_change, shift_error
from afconvert.layers.spectral import ideal_lowpass, ideal_resample
from afconvert.settings import using
from afconvert.sources.models import create_source_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SIZE = (48, 40)
SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, 2 / 3)]


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 products (cuDNN convolutions default to TF32: 10-bit mantissas)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("method", ["fft", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resampling_on_cuda_equals_cpu(method, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 24, generator=g, dtype=torch.float64).to(dtype)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    for op in (lambda t: ideal_resample(t, (34, 12), method=method), lambda t: ideal_lowpass(t, 0.5, method=method)):
        ref, out = op(x), op(x.cuda())
        assert out.is_cuda and out.dtype == dtype
        assert float((out.cpu() - ref).abs().max()) <= tol * float(x.abs().max())


def test_auto_takes_matmul_unless_tf32_is_allowed():
    x = torch.randn(1, 2, 12, 10, device="cuda")
    assert torch.equal(ideal_resample(x, (24, 20)), ideal_resample(x, (24, 20), method="matmul"))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert torch.equal(ideal_resample(x, (24, 20)), ideal_resample(x, (24, 20), method="fft"))
        x64 = x.double()        # TF32 concerns float32 products only
        assert torch.equal(ideal_resample(x64, (24, 20)), ideal_resample(x64, (24, 20), method="matmul"))
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.fixture(scope="module")
def converted():
    source, _ = create_source_model("test_efficientnet", pretrained=False, num_classes=10)
    return afconvert.convert(source, input_size=SIZE).eval()


def _shift_change(model, x):
    return shift_error(model, x, SHIFTS, scale="spread")


@pytest.mark.parametrize("method", ["auto", "matmul"])
def test_converted_model_on_cuda_is_invariant_and_matches_cpu(converted, method):
    x = random_input(4, 3, SIZE, torch.float64)
    f64 = copy.deepcopy(converted).double()
    with torch.no_grad():
        ref = f64(x)
    with using(resample=method):
        gpu = f64.cuda()
        assert _shift_change(gpu, x.cuda()) < 1e-10
        with torch.no_grad():
            assert relative_change(gpu(x.cuda()).cpu(), ref) < 1e-10
        f32 = copy.deepcopy(converted).cuda()
        with torch.no_grad():
            assert relative_change(f32(x.float().cuda()).double().cpu(), ref) < 1e-3


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_stays_finite_and_close(converted, amp):
    """Under autocast the FFT / polynomial / norm layers compute in float32: finite logits near float32's,
    and a training step gives finite gradients."""
    model = copy.deepcopy(converted).cuda()
    x = random_input(4, 3, SIZE).cuda()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=amp):
            y = model(x)
    assert torch.isfinite(y).all()
    assert relative_change(y.float(), ref) < 5e-2
    model.train()
    with torch.autocast("cuda", dtype=amp):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
