"""Export (afconvert.export): ONNX (the file runs in onnxruntime and gives the PyTorch logits, at any batch size)
and torch.compile (one whole graph, the same logits)."""
import pytest
import torch

import afconvert
from afconvert.export import export_onnx, onnx_max_rel_error

SIZE = (32, 40)


def tiny_convnet() -> torch.nn.Module:
    """One layer of each family the rules replace: strided conv, BatchNorm, ReLU, max pool, GELU,
    channel LayerNorm, global pooling, linear head."""
    from timm.layers import LayerNorm2d
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(8, 16, 3, 1, 1), LayerNorm2d(16), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


def test_onnx_round_trip_matches_pytorch(tmp_path, one_thread, onnx_tools):
    """A converted model with every replaced family: exported, run in onnxruntime, the PyTorch logits.
    (A tiny model: full models take far longer to export; their figures are in docs/export.md.)"""
    model = afconvert.convert(tiny_convnet(), input_size=SIZE, check_numerics=False).eval()
    assert model.afconvert_report.verdict.value == "exact"
    res = export_onnx(model, tmp_path / "m.onnx", SIZE)
    assert res.path.is_file() and res.max_rel_error < 1e-4, res
    # the batch dim is free: 3 images through a file traced with 2
    g = torch.Generator().manual_seed(1)
    assert onnx_max_rel_error(model, res.path, torch.randn(3, 3, *SIZE, generator=g)) < 1e-4
    # ... the size is not: the resampling matrices are the traced size's
    with pytest.raises(Exception):
        onnx_max_rel_error(model, res.path, torch.randn(2, 3, 48, 48, generator=g))
    # no complex numbers, no FFT in the file: the matmul form, which ONNX can hold
    import onnx
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert "MatMul" in ops and not ops & {"DFT", "STFT"}, ops


def test_torch_compile_captures_one_graph_and_matches(one_thread):
    """torch.compile sees the whole converted model as one graph (fullgraph: no break at the cached
    resampling matrices, the L4 scale or the casts), holds the matrices as constants (no FFT that builds
    them in the graph), and computes the same logits. The capture is what can fail; the backend here just
    runs the captured graph (inductor's C++ build: `afconvert bench MODEL --compile`)."""
    model = afconvert.convert(tiny_convnet(), input_size=SIZE, check_numerics=False).eval()
    x = torch.randn(2, 3, *SIZE)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=capture, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(graphs) == 1 and torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    targets = {str(n.target) for n in graphs[0].graph.nodes}
    assert not [t for t in targets if "fft" in t], targets
