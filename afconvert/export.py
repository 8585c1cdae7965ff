"""ONNX export of a converted model, checked in onnxruntime.

Complex-valued FFTs have no ONNX form, so the model is traced with every ideal resampling and filter in
its dense real form (the ``resample`` setting "matmul": the same linear maps, A_0 X A_1^T); the matrices
depend on the map sizes, so a file holds one input size (H, W) and any batch size. ``torch.onnx.export``
(torch.export based, the maintained exporter) writes it; the file is written atomically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from afconvert import settings
from afconvert.atomic import atomic_write

__all__ = ["OnnxExport", "export_onnx", "onnx_max_rel_error"]


@dataclass
class OnnxExport:
    path: Path
    input_size: tuple[int, int]
    seconds: float
    max_rel_error: float | None      # onnxruntime against PyTorch on a random batch; None: not checked


def _need(module: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"ONNX export needs the package '{module}'; fix: pip install 'afconvert[export]'")


def onnx_max_rel_error(model: nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """max |onnxruntime(x) - model(x)| / max |model(x)| for the file at ``path``, on a CPU."""
    _need("onnxruntime")
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(x).double()
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).double()
    if out.shape != ref.shape:
        raise RuntimeError(f"onnxruntime returned shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def export_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int], in_chans: int = 3,
                opset: int | None = None, check: bool = True, seed: int = 0, batch_size: int | None = None
                ) -> OnnxExport:
    """Write ``model`` (on the CPU, eval mode) as ONNX for (N, in_chans, H, W) inputs: N dynamic, or fixed to
    ``batch_size`` (a static graph: twice as fast to export, for fixed-shape runtimes).

    With ``check``, runs the file in onnxruntime on a random batch and reports the largest error relative
    to the largest PyTorch logit (the model's default resampling form, as a user runs it)."""
    _need("onnx")
    _need("onnxscript")
    h, w = (int(s) for s in input_size)
    model = model.cpu().eval()
    g = torch.Generator().manual_seed(seed)
    n = batch_size or 2
    x = torch.randn(n, in_chans, h, w, generator=g)
    t0 = time.perf_counter()
    kwargs = {} if opset is None else {"opset_version": opset}
    with settings.using(resample="matmul"), torch.no_grad():
        model(x)    # builds (and caches) every resampling matrix: the trace then holds them as constants
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=None if batch_size else ({0: torch.export.Dim("batch")},),
                                    verbose=False, **kwargs)
    path = Path(path)
    atomic_write(path, program.model_proto.SerializeToString())
    seconds = time.perf_counter() - t0
    error = onnx_max_rel_error(model, path, torch.randn(n, in_chans, h, w, generator=g)) if check else None
    return OnnxExport(path, (h, w), seconds, error)
