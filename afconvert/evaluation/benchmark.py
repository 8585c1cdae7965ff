"""Cost of a converted model against its source, measured side by side in one run.

Per model: the median time of a batch (``torch.utils.benchmark``: warm-up, CUDA synchronisation,
the process's thread count), images per second and the peak memory of the step; the ratios are
converted / original. Inference is a forward under ``torch.no_grad``; a training step is forward,
a cross-entropy loss and backward. Peak memory: CUDA's allocator statistics, or on a CPU the
highest running total of the tensors the step allocates and frees (``torch.profiler``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn

from afconvert.layers import products

__all__ = ["AMP_DTYPES", "Measurement", "measure", "compare", "profile_table", "malloc_setting"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}     # the autocast choices of the cost commands


@dataclass
class Measurement:
    label: str
    ms_per_batch: float
    images_per_s: float
    peak_mb: float | None          # None: not measurable (compiled code on a CPU allocates outside the profiler)


def _step(model: nn.Module, x: torch.Tensor, train: bool, amp: torch.dtype | None = None):
    """One inference (no_grad) or training step (cross-entropy, backward), under ``amp`` autocast if given."""
    def autocast():
        return torch.autocast(x.device.type, dtype=amp, enabled=amp is not None)
    if not train:
        def run():
            with torch.no_grad(), autocast():
                model(x)
        return run
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def run():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
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
            label: str = "", amp: torch.dtype | None = None, memory: bool = True) -> Measurement:
    """One model's cost on batch ``x`` (already on its device)."""
    import torch.utils.benchmark as benchmark
    model.train(train)
    run = _step(model, x, train, amp)
    run()                                               # warm-up (caches, lazy init)
    timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    ms = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return Measurement(label, ms, x.shape[0] / ms * 1e3, _peak_mb(run, x.device) if memory else None)


def _input(batch_size: int, input_size: Sequence[int], device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *input_size, generator=g).to(device)


def compare(source: nn.Module, converted: nn.Module, batch_size: int = 8, input_size: Sequence[int] = (224, 224),
            device: str = "cpu", train: bool = False, min_run_time: float = 2.0, seed: int = 0,
            compile: bool = False, amp: torch.dtype | None = None) -> dict:
    """Both models on the same input, one after the other: {"original", "converted", "ratio"} with the
    ratios converted / original of time per batch and peak memory. ``compile``: both through
    ``torch.compile`` first (compilation happens in the warm-up, outside the timing); ``amp``: both
    under autocast to that dtype (the converted model's FFT, polynomial and norm layers keep float32)."""
    dev = torch.device(device)
    x = _input(batch_size, input_size, dev, seed)
    models = (("original", source.to(dev)), ("converted", converted.to(dev)))
    if compile:
        models = tuple((label, torch.compile(m)) for label, m in models)
    memory = not (compile and dev.type == "cpu")
    rows = {label: measure(m, x, train, min_run_time, label, amp, memory) for label, m in models}
    o, c = rows["original"], rows["converted"]
    return {"original": asdict(o), "converted": asdict(c),
            "ratio": {"time": c.ms_per_batch / o.ms_per_batch,
                      "memory": c.peak_mb / max(o.peak_mb, 1e-9) if memory else None},
            "mode": "train step" if train else "inference", "batch_size": batch_size,
            "input_size": list(input_size), "device": str(dev), "threads": torch.get_num_threads(),
            "compiled": compile, "amp": None if amp is None else str(amp).removeprefix("torch."),
            "malloc": malloc_setting(), "products": products.backend(dev)}


def malloc_setting() -> str:
    """The allocator this process measures under: a preloaded one (``LD_PRELOAD``: jemalloc, TCMalloc, as
    PyTorch's CPU tuning guide advises) by its file name, else "system"."""
    preload = [p.rsplit("/", 1)[-1] for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
    return ", ".join(preload) or "system"


def profile_table(model: nn.Module, batch_size: int = 8, input_size: Sequence[int] = (224, 224), device: str = "cpu",
                  train: bool = False, rows: int = 12, seed: int = 0, amp: torch.dtype | None = None) -> str:
    """Where one step of ``model`` spends its time: ``torch.profiler``'s operators by self time (CPU, or
    CUDA on a GPU), the top ``rows``, as its text table."""
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device(device)
    x = _input(batch_size, input_size, dev, seed)
    model = model.to(dev).train(train)
    run = _step(model, x, train, amp)
    run()
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(dev)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
