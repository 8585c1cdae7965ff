"""afconvert.allocator: with freed memory kept, re-allocating a large tensor costs no page faults (it does under
glibc's defaults: the check can fail); the user's own settings are left alone; the CLI sets it first."""
import os
import subprocess
import sys

import pytest
import torch

from afconvert import allocator

# minor page faults of 4 steps that each allocate, write and free a 64 MB and a 32 MB tensor, after 12 such steps
# (the heap reaches its size within a few: freed blocks coalesce)
_FAULTS = """
import resource, sys, torch
from afconvert.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def step():
    a, b = torch.empty(1 << 24).fill_(1.0), torch.empty(1 << 23).fill_(2.0)
for _ in range(12):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, *allocator._USER_SETTINGS)}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not allocator.glibc(), reason="glibc only")
def test_reused_memory_takes_no_page_faults():
    system, reused = _faults("system"), min(_faults("reuse") for _ in range(2))
    pages = 4 * (3 << 25) // os.sysconf("SC_PAGE_SIZE")
    assert system > pages // 2          # each tensor a fresh mmap, zero-filled page by page
    # at most a block now and then (the heap still settling: one step's 96 MB in 1 of about 15 runs), hence the
    # better of two runs
    assert reused < pages // 4


@pytest.mark.parametrize("env", [{allocator.ENV: "system"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_user_settings_are_left_alone(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert allocator.reuse_freed_memory() is False


def test_benchmarks_say_which_malloc_ran(monkeypatch):
    from afconvert.evaluation.benchmark import compare
    net = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())  # noqa: E731
    for state, said in ((False, "system"), (True, "freed memory reused")):
        monkeypatch.setattr(allocator, "_SET", [state])
        assert compare(net(), net(), 1, (8, 8), min_run_time=0.01)["malloc"] == said


def test_the_cli_sets_it_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    from afconvert.cli import main
    assert main(["recipes"]) == 0 and calls == [1]
