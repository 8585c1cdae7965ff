"""The command line.

    afconvert MODEL --out model.pt [--weights FILE | --no-pretrained] [--recipe afc] [--input-size H W]
    afconvert audit MODEL_OR_CHECKPOINT [--format json]
    afconvert eval MODEL_OR_CHECKPOINT [MORE ...] --data DIR [--metrics ...] [--grid ...] [--json] [--plot FILE]
    afconvert recipes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm name (convnext_tiny), torchvision:NAME, or (audit) an afconvert checkpoint")
    p.add_argument("--weights", metavar="FILE", help="local weights: a state_dict / checkpoint file (also an "
                                                        "official Alias-Free ConvNeXt checkpoint)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (no download)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="input size for layout inference and the checks (default 64 64; the checks also run at the "
                        "model's native size)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert", description="Make a pretrained convnet alias-free (AFC).",
                                epilog="other commands: `afconvert audit MODEL`, `afconvert eval MODEL... --data DIR`, "
                                       "`afconvert recipes`")
    _common(p)
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


def _audit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert audit", description="Per-layer alias-free certificate of a model.")
    _common(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--all", action="store_true", help="list every node, not only those that matter")
    return p


def _model_kwargs(args) -> dict:
    return {"num_classes": args.num_classes} if args.num_classes is not None else {}


class NumericallyUnstableError(ValueError):
    """The converted model's logits are non-finite or explode: not written."""


def _run_convert(argv: list[str]) -> int:
    import afconvert
    from .engine import check_sizes
    from .pipeline import build
    from .report import format_check
    from .shift_check import shift_check

    args = _convert_parser().parse_args(argv)
    out = Path(args.out)
    if args.out.endswith(("/", "\\")) or (out.exists() and out.is_dir()):
        raise ValueError(f"--out {out} is a directory; fix: give a file path such as {out / 'model.pt'}")
    t0 = time.perf_counter()
    built = build(args.model, weights=args.weights, pretrained=not args.no_pretrained, recipe=args.recipe,
                  input_size=args.input_size, calibration=args.calibration, **_model_kwargs(args))
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
        for size in check_sizes(built.converted, info["input_size"]):
            check = shift_check({"original": built.source, "converted": built.converted}, size, info["in_chans"])
            report.checks.append(check)
            print(format_check(check))
    if args.strict and (report.offenders or not report.stable):
        raise afconvert.NotAliasFreeError("strict: " + report.verdict_text)
    afconvert.save(built.converted, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); load with afconvert.load('{out}')")
    return 0


def _run_audit(argv: list[str]) -> int:
    import afconvert
    from .models import create_source_model

    args = _audit_parser().parse_args(argv)
    if Path(args.model).is_file():
        model = afconvert.load(args.model)
        size = args.input_size or model.afconvert_info["input_size"]
    else:
        model, _ = create_source_model(args.model, weights=args.weights, pretrained=not args.no_pretrained,
                                       **_model_kwargs(args))
        size = args.input_size
    report = afconvert.audit(model, input_size=size)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table(all_nodes=args.all))
        print(report.summary())
    if not report.stable:
        print(f"afconvert audit: error: numerically unstable: {report.instability}; fix: re-convert with recipe afc "
              f"or fine-tune it", file=sys.stderr)
        return 1
    return 0


def _run_recipes(argv: list[str]) -> int:
    from .recipes import list_recipes
    for name, summary in list_recipes().items():
        print(f"{name:<12} {summary}")
    return 0


def _run_eval(argv: list[str]) -> int:
    from .evaluate import run
    return run(argv)


COMMANDS = {"audit": _run_audit, "recipes": _run_recipes, "eval": _run_eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else _run_convert(argv)
    except KeyboardInterrupt:
        print("afconvert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"afconvert: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
