"""``afconvert train MODEL --recipe R --data DIR --output DIR``: train a model from scratch on labelled images.

The paper's path: the network is built with random weights (or ``--weights``), converted with ``--recipe``
(``none``: the unconverted baseline) and trained by cross-entropy on the data's labels, in the very loop of
``afconvert finetune`` (the same arguments, checkpoints, ``--resume``, torchrun, CSV and curves), without a
teacher. The random initial weights follow ``--seed``. BatchNorm statistics train (``--no-train-bn`` keeps
them). ``final.pt`` loads with ``afconvert.load`` and carries its data config.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from afconvert.cli.common import guarded, model_kwargs
from afconvert.cli.training import add_training_arguments, report, training_config

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert train", description="Train a model from scratch, converted by a "
                                "recipe (none: the baseline), on labelled images (timm-style options; torchrun).")
    p.add_argument("model", help="timm name (resnet18) or torchvision:NAME")
    p.add_argument("--recipe", default="afc", help="recipe the model is converted with first (default afc; none: "
                                                   "unconverted)")
    p.add_argument("--weights", metavar="FILE", help="initial weights (default: random)")
    add_training_arguments(p, distill=False, lr=1e-3)
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    import os

    import torch

    from afconvert.sources.resolve import resolve
    from afconvert.train.finetune import finetune
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    torch.manual_seed(args.seed)        # the initial weights too are a function of --seed
    model = resolve(args.model, weights=args.weights, pretrained=args.weights is not None, recipe=args.recipe,
                    input_size=tuple(args.input_size) if args.input_size else None, **model_kwargs(args)).model
    return report(finetune(model, None, training_config(args), log=log), rank)


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert train", _main, argv)
