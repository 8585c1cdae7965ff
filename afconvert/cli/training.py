"""What ``afconvert finetune`` and ``afconvert train`` share: their flags, built from the fields of
``FinetuneConfig`` (``afconvert.train.config``), the config the parsed flags describe, and the closing report.
Nothing here imports torch."""
from __future__ import annotations

import argparse
import dataclasses

__all__ = ["add_training_arguments", "training_config", "report"]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _argument(f: dataclasses.Field, default) -> dict:
    """argparse keywords of one ``FinetuneConfig`` field: its type from the annotation, ``default`` shown."""
    meta, hint = f.metadata, str(f.type)
    required = f.default is dataclasses.MISSING
    kw = {"dest": f.name, **({"required": True} if required else {"default": default})}
    if hint == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif hint.startswith("tuple["):
        kw.update(nargs=2, type=float if "float" in hint else int)
    else:
        kw["type"] = next(t for t in (int, float, str) if t.__name__ in hint)
    for key in ("metavar", "choices"):
        if key in meta:
            kw[key] = meta[key]
    if default is None or required:
        shown = ""
    elif hint == "bool":
        shown = f"default {'on' if default else 'off'}"
    else:
        shown = "default " + " ".join(f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)
                                      for v in (default if isinstance(default, tuple) else (default,)))
    kw["help"] = "; ".join(x for x in (meta.get("help", ""), shown) if x) or None
    return kw


def add_training_arguments(p: argparse.ArgumentParser, distill: bool = True, **defaults) -> None:
    """``--num-classes`` and ``--in-chans`` of models given by name, then one flag per ``FinetuneConfig`` field
    (its ``distill`` ones only if ``distill``), with the field's default unless ``defaults`` overrides it
    (``train``: ``lr=1e-3``)."""
    from afconvert.train.config import FinetuneConfig
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of models given by name")
    p.add_argument("--in-chans", type=int, default=None, help="input channels of models given by name (1: grayscale)")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(FinetuneConfig):
        if f.metadata.get("distill") and not distill:
            continue
        group = f.metadata.get("group")
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        (groups[group] if group else p).add_argument(_flag(f), **_argument(f, defaults.get(f.name, f.default)))


def training_config(args):
    """The ``FinetuneConfig`` that the parsed flags describe."""
    from afconvert.train.config import FinetuneConfig
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    return FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def report(summary: dict, rank: int) -> int:
    """Print a run's summary (rank 0); the exit code: 1 when the trained model is numerically unstable."""
    if rank == 0:
        print(f"trained {summary['steps']} steps on {summary['world_size']} process(es); "
              f"{summary['skipped_images']} unreadable image(s) skipped")
        print(f"wrote {summary['final']} (afconvert.load)" + (f" and {summary['curves']}" if summary["curves"] else ""))
        if summary.get("val_top1") is not None:
            print(f"validation top-1: {summary['val_top1']:.2f} %")
        print(f"certificate after training: {summary['verdict']}")
    return 0 if rank != 0 or summary["stable"] else 1
