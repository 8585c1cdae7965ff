"""A training run's checkpoint, ``OUTPUT/last.pt``: written atomically, read back to resume exactly.

It holds the model, optimizer, scheduler, EMA, grad scaler, step, every rank's RNG state and the launch
that wrote it (rank 0's host, its launcher's pid and the rendezvous id). ``--resume`` continues from it;
under ``torchrun --max-restarts N`` the restarted workers of the same launch resume from it by themselves,
while another launch's run in the folder is refused. Rank 0 writes; every rank takes part in gathering
the RNG states.
"""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from afconvert.atomic import atomic_torch_save
from afconvert.data import DataError

__all__ = ["Checkpointer", "CheckpointError", "TRAIN_FORMAT", "restart_count"]

TRAIN_FORMAT = "afconvert-train/1"
RUN_FILES = ("last.pt", "log.csv", "final.pt", "teacher.pt")


class CheckpointError(DataError):
    """A run folder or checkpoint that cannot be used; the message names the fix."""


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this launch's workers; 0 outside it."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _launch_id(world: int) -> str:
    """Names this launch, the same in each restart of its workers and different for another launch: rank
    0's host, its launcher's pid (torchrun's agent is the workers' parent) and the rendezvous id."""
    launch = [f"{socket.gethostname()}:{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"]
    if world > 1:
        dist.broadcast_object_list(launch, src=0)
    return launch[0]


class Checkpointer:
    """``out/last.pt`` of one run: ``resume_state`` finds what to resume (or refuses the folder), ``save``
    writes the run's whole state."""

    def __init__(self, out: Path, rank: int, world: int):
        self.out, self.rank, self.world = Path(out), rank, world
        self.path = self.out / "last.pt"
        self.launch = _launch_id(world)

    def read(self) -> dict:
        from afconvert.sources.models import load_error
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"--resume: cannot read {self.path}: {load_error(exc)}; fix: start a new run in "
                                  f"another --output") from None
        if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
            raise CheckpointError(f"--resume: {self.path} is not an afconvert training checkpoint; fix: point "
                                  f"--output at the folder of the run to resume")
        return state

    def resume_state(self, resume: bool) -> dict | None:
        """The state to resume from, or None for a new run; refuses to overwrite another run. A restarted
        worker (``restart_count() > 0``) resumes its own launch's checkpoint without ``--resume``."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--output {out} is a file; fix: give a folder")
        if resume:
            if not self.path.is_file():
                raise CheckpointError(f"--resume: no checkpoint {self.path}; fix: drop --resume to start a new run")
            state = self.read()
        elif restart_count() and self.path.is_file() and (state := self.read()).get("launch") == self.launch:
            pass
        elif out.is_dir() and any((out / n).exists() for n in RUN_FILES):
            raise CheckpointError(f"--output {out} holds another run; fix: --resume to continue it, or choose "
                                  f"another --output")
        else:
            return None
        if state["world_size"] != self.world:
            raise CheckpointError(f"--resume: the run used {state['world_size']} process(es), this one "
                                  f"{self.world}; fix: resume with --nproc_per_node={state['world_size']}")
        return state

    def save(self, **state) -> None:
        """Write ``state`` (model, optimizer, ... as tensors and plain data) with the step's RNG states of
        every rank; every rank must call it."""
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.rank == 0:
            full = {"format": TRAIN_FORMAT, "world_size": self.world, "launch": self.launch, **state, "rng": rng}
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(self.path, full)
