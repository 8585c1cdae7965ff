"""The command line.

    afconvert MODEL --out model.pt [--weights FILE | --no-pretrained] [--recipe afc] [--input-size H W]
    afconvert audit MODEL_OR_CHECKPOINT [--format json]
    afconvert eval MODEL_OR_CHECKPOINT [MORE ...] --data DIR [--metrics ...] [--grid ...] [--json] [--plot FILE]
    afconvert finetune STUDENT --data DIR --output DIR [--steps N] [--resume] ...   (also under torchrun)
    afconvert train MODEL --recipe R --data DIR --output DIR [--epochs N] [--resume] ...   (also under torchrun)
    afconvert recover MODEL_OR_CHECKPOINT --data DIR --out FILE [--input-size H W] [--images N] ...
    afconvert bench MODEL [--recipe afc] [--batch-size 8] [--input-size H W] [--device cpu] [--train] [--compile]
                          [--resample auto|fft|matmul] [--profile N] [--json]
    afconvert export MODEL_OR_CHECKPOINT --onnx FILE [--input-size H W] [--no-check]
    afconvert recipes

Each command is a module with ``run(argv)``, imported only when it runs; torch is imported only
after the arguments are read, so ``--help`` and argument errors answer at once and Ctrl-C at any
moment is one line. No command changes anything process-wide that the user did not ask for.
"""
from __future__ import annotations

import sys

__all__ = ["main"]

COMMANDS = ("audit", "eval", "recipes", "finetune", "train", "bench", "export", "recover")   # each a module here


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import importlib
        name = argv[0] if argv and argv[0] in COMMANDS else None
        module = importlib.import_module(f"afconvert.cli.{name or 'convert'}")
        return module.run(argv[1:] if name else argv)
    except KeyboardInterrupt:
        print("afconvert: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
