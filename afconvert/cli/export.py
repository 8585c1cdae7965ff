"""``afconvert export MODEL_OR_CHECKPOINT --onnx FILE``: an ONNX file of the converted model, checked in onnxruntime.

A checkpoint written by ``afconvert MODEL --out FILE`` is exported as it is; a model name is converted
first (``--recipe``, ``--weights`` / ``--no-pretrained`` as for ``afconvert MODEL``). The file holds one
input size (``--input-size``, default the model's native size, e.g. 224 224) and any batch size.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from afconvert.cli.common import add_model_arguments, check_output_path, guarded, model_kwargs

__all__ = ["run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afconvert export", description="Export a converted model to ONNX (real "
                                "matmul form of every ideal filter) and check it in onnxruntime.")
    add_model_arguments(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="where to write the .onnx file")
    p.add_argument("--recipe", default="afc", help="recipe when MODEL is a name (default afc)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="fix the batch size (a static graph, exported twice as fast); default: any batch size")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    check_output_path(args.onnx, "--onnx", "model.onnx")
    from afconvert.sources.resolve import resolve
    model = resolve(args.model, weights=args.weights, pretrained=not args.no_pretrained, recipe=args.recipe,
                    input_size=args.input_size, **model_kwargs(args)).model

    from afconvert.converter.certify import native_input_size
    from afconvert.export import export_onnx
    info = getattr(model, "afconvert_info", None)
    chans = info.in_chans if info else 3
    size = args.input_size or native_input_size(model)
    res = export_onnx(model, args.onnx, size, in_chans=chans, opset=args.opset,
                      check=not args.no_check, batch_size=args.batch_size)
    checked = "not checked" if res.max_rel_error is None else \
        f"onnxruntime matches PyTorch to {res.max_rel_error:.1e} (max error / max logit)"
    batch = args.batch_size or "N"
    print(f"wrote {res.path} ({res.path.stat().st_size / 1e6:.1f} MB) for inputs ({batch}, {chans}, "
          f"{size[0]}, {size[1]}) in {res.seconds:.1f} s; {checked}")
    return 0


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert export", _main, argv)
