"""Cost of a converted model against its source, measured side by side in one run.

Per model: the median time of a batch (``torch.utils.benchmark``: warm-up, CUDA synchronisation,
the process's thread count), images per second and the peak memory of the step; the ratios are
converted / original. Inference is a forward under ``torch.no_grad``; a training step is forward,
a cross-entropy loss and backward. Peak memory: CUDA's allocator statistics, or on a CPU the
highest running total of the tensors the step allocates and frees (``torch.profiler``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["Measurement", "measure", "compare"]


@dataclass
class Measurement:
    label: str
    ms_per_batch: float
    images_per_s: float
    peak_mb: float


def _step(model: nn.Module, x: torch.Tensor, train: bool):
    if not train:
        def run():
            with torch.no_grad():
                model(x)
        return run
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def run():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
    return run


def _peak_mb(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    total = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        # an op's own allocations (+) and frees (-), and frees outside any op ("[memory]"), in time order
        total += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak / 2 ** 20


def measure(model: nn.Module, x: torch.Tensor, train: bool = False, min_run_time: float = 2.0,
            label: str = "") -> Measurement:
    """One model's cost on batch ``x`` (already on its device)."""
    import torch.utils.benchmark as benchmark
    model.train(train)
    run = _step(model, x, train)
    run()                                               # warm-up (caches, lazy init)
    timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    ms = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return Measurement(label, ms, x.shape[0] / ms * 1e3, _peak_mb(run, x.device))


def compare(source: nn.Module, converted: nn.Module, batch_size: int = 8, input_size: Sequence[int] = (224, 224),
            device: str = "cpu", train: bool = False, min_run_time: float = 2.0, seed: int = 0) -> dict:
    """Both models on the same input, one after the other: {"original", "converted", "ratio"} with the
    ratios converted / original of time per batch and peak memory."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *input_size, generator=g).to(dev)
    rows = {label: measure(m.to(dev), x, train, min_run_time, label)
            for label, m in (("original", source), ("converted", converted))}
    o, c = rows["original"], rows["converted"]
    return {"original": asdict(o), "converted": asdict(c),
            "ratio": {"time": c.ms_per_batch / o.ms_per_batch, "memory": c.peak_mb / max(o.peak_mb, 1e-9)},
            "mode": "train step" if train else "inference", "batch_size": batch_size,
            "input_size": list(input_size), "device": str(dev), "threads": torch.get_num_threads()}
