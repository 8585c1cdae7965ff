"""What every command shares: the model arguments, output-path checks, and one-line errors.

Nothing here imports torch: ``--help`` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["add_model_arguments", "model_kwargs", "check_output_path", "one_line", "guarded"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm name (convnext_tiny), torchvision:NAME, or (audit) an afconvert checkpoint")
    p.add_argument("--weights", metavar="FILE", help="local weights: a state_dict / checkpoint file (also an "
                                                        "official Alias-Free ConvNeXt checkpoint)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (no download)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="input size for layout inference and the checks (default 64 64; the checks also run at the "
                        "model's native size)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's; 1: grayscale)")
    p.add_argument("--features-only", action="store_true", help="timm's backbone: the feature maps of each stage "
                   "(each certified equivariant with its stride)")
    p.add_argument("--out-indices", nargs="+", type=int, default=None, metavar="I",
                   help="with --features-only: the stages to return (timm's out_indices)")


def model_kwargs(args) -> dict:
    """timm keyword arguments of a model given by name: --num-classes, --in-chans, --features-only,
    --out-indices."""
    if getattr(args, "out_indices", None) is not None and not getattr(args, "features_only", False):
        raise ValueError("--out-indices selects feature maps; fix: add --features-only")
    pairs = (("num_classes", args.num_classes), ("in_chans", args.in_chans),
             ("features_only", getattr(args, "features_only", False) or None),
             ("out_indices", tuple(args.out_indices) if getattr(args, "out_indices", None) else None))
    return {k: v for k, v in pairs if v is not None}


def check_output_path(path: str | None, flag: str, example: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, or a parent that is
    missing or not a directory."""
    if path is None:
        return
    p = Path(path)
    if str(path).endswith(("/", "\\")) or p.is_dir():
        raise ValueError(f"{flag} {p} is a directory; fix: give a file path such as {p / example}")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{flag} {p}: {parent} is a file, not a directory; fix: choose another path")
    if not parent.exists():
        raise ValueError(f"{flag} {p}: directory {parent} does not exist; fix: create it first")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def guarded(prog: str, command: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run ``command(argv)``: an expected error is one line on stderr (exit 2), Ctrl-C one line (130)."""
    try:
        return command(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, ImportError) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
