"""Atomic file writes: a temporary file beside the target, then a rename. Every file afconvert writes
goes through ``atomic_write`` (``atomic_torch_save`` and ``atomic_savefig`` are its two common uses).

An interrupted or failed write never leaves a half-written file, and an existing file stays as it
was until the new one is complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_torch_save", "atomic_savefig"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None] | bytes | str) -> None:
    """Write ``path`` atomically: ``write`` is the content (bytes or text) or a function writing to
    a binary file object. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(write):
                write(fh)
            else:
                fh.write(write.encode() if isinstance(write, str) else write)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(path: str | Path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_savefig(path: str | Path, fig, **kwargs) -> None:
    """A matplotlib figure saved as PNG to ``path`` atomically (``kwargs``: ``savefig``'s, e.g. dpi)."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", **kwargs))
