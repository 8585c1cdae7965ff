"""``afconvert audit MODEL_OR_CHECKPOINT``: the per-layer certificate, numerics and shift checks."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from afconvert.cli.common import add_model_arguments, guarded, model_kwargs

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert audit", description="Per-layer alias-free certificate of a model. "
                                "Exit code 1 when its logits are numerically unstable, or when the analysis finds "
                                "it exact and the float64 measurement sees it move (a bug to report).")
    add_model_arguments(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--all", action="store_true", help="list every node, not only those that matter")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    from afconvert.converter.engine import audit
    from afconvert.sources.resolve import resolve

    resolved = resolve(args.model, weights=args.weights, pretrained=not args.no_pretrained, **model_kwargs(args))
    model = resolved.model
    size = args.input_size or (model.afconvert_info.input_size if resolved.checkpoint else None)
    report = audit(model, input_size=size)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table(all_nodes=args.all))
        print(report.summary())
    if not report.stable:
        print(f"afconvert audit: error: numerically unstable: {report.instability}; fix: re-convert with recipe afc "
              f"or fine-tune it", file=sys.stderr)
        return 1
    if report.contradicted:
        print(f"afconvert audit: error: {report.disagreement}", file=sys.stderr)
        return 1
    return 0


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert", _main, argv)
