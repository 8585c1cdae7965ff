"""``afconvert recipes``: the shipped recipes, one line each."""
from __future__ import annotations

import argparse
from typing import Sequence

from afconvert.cli.common import guarded

__all__ = ["run"]


def _main(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="afconvert recipes", description="List the shipped recipes.").parse_args(argv)
    from afconvert.converter.recipe import list_recipes
    for name, summary in list_recipes().items():
        print(f"{name:<12} {summary}")
    return 0


def run(argv: Sequence[str]) -> int:
    return guarded("afconvert", _main, argv)
