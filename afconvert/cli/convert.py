"""``afconvert MODEL --out FILE``: convert a model, report and check it, and write it atomically."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from afconvert.cli.common import (
    add_model_arguments,
    check_output_path,
    guarded,
    model_kwargs,
)

__all__ = ["run", "NumericallyUnstableError"]


class NumericallyUnstableError(ValueError):
    """The converted model's logits are non-finite or explode: not written."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert", description="Make a pretrained convnet alias-free (AFC).",
                                epilog="other commands: `afconvert audit MODEL`, `afconvert eval MODEL... --data DIR`, "
                                       "`afconvert finetune`, `afconvert bench MODEL`, `afconvert export MODEL --onnx "
                                       "FILE`, `afconvert recipes`")
    add_model_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the converted model (.pt)")
    p.add_argument("--recipe", default="afc", help="shipped recipe name or a .toml file (see `afconvert recipes`)")
    p.add_argument("--calibration", metavar="DIR", help="images to fit each activation's polynomial on, per channel "
                                                         "(and to re-estimate BatchNorm statistics if the recipe asks)")
    p.add_argument("--strict", action="store_true", help="fail if any layer is not exactly alias-free")
    p.add_argument("--table", action="store_true", help="print the per-layer table")
    p.add_argument("--no-check", action="store_true", help="skip the empirical shift check")
    p.add_argument("--allow-unstable", action="store_true",
                   help="write the model even if its logits are non-finite or explode (e.g. to fine-tune it)")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    check_output_path(args.out, "--out", "model.pt")
    from afconvert.sources.names import check_name
    if not Path(args.model).is_file():
        check_name(args.model)  # before importing torch: a misspelled name fails at once

    from afconvert.converter.certify import shift_check
    from afconvert.converter.engine import check_sizes
    from afconvert.converter.report import NotAliasFreeError, format_check
    from afconvert.sources.checkpoint import save
    from afconvert.sources.pipeline import build

    out = Path(args.out)
    t0 = time.perf_counter()
    built = build(args.model, weights=args.weights, pretrained=not args.no_pretrained, recipe=args.recipe,
                  input_size=args.input_size, calibration=args.calibration, **model_kwargs(args))
    report = built.converted.afconvert_report
    print(f"source: {built.spec.library}:{built.spec.name}   weights: {built.spec.weights}")
    for note in built.notes:
        print(f"note: {note}")
    print(f"converted in {time.perf_counter() - t0:.1f} s")
    print(report.summary())
    if args.table:
        print(report.table())
    if not report.stable and not args.allow_unstable:
        raise NumericallyUnstableError(f"the converted model is numerically unstable ({report.instability}); "
                                       f"nothing written; fix: use recipe afc (scale-equivariant activations) or "
                                       f"--calibration DIR, or pass --allow-unstable to write it for fine-tuning")
    if not args.no_check and report.stable:
        info = built.converted.afconvert_info
        for size in check_sizes(built.converted, info.input_size):
            check = shift_check({"original": built.source, "converted": built.converted}, size, info.in_chans)
            report.checks.append(check)
            print(format_check(check))
    if args.strict and (report.offenders or not report.stable or report.contradicted):
        raise NotAliasFreeError("strict: " + report.verdict_text)
    save(built.converted, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); load with afconvert.load('{out}')")
    return 0


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert", _main, argv)
