"""Recipes: TOML files in ``rules/`` choosing, per rule family, the options to convert with."""
from __future__ import annotations

import difflib
import importlib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from afconvert.converter.rule import Rule

__all__ = ["Recipe", "load_recipe", "list_recipes", "all_rules"]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    options: dict = field(default_factory=dict)   # family -> options
    source: str = ""

    def for_family(self, family: str) -> dict:
        return dict(self.options.get(family, {}))


def _recipe_files() -> dict[str, Path]:
    root = resources.files("afconvert.rules")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line summary, for every recipe shipped in ``rules/``."""
    return {name: load_recipe(name).summary for name in sorted(_recipe_files())}


def load_recipe(recipe: "str | Path | Recipe", overrides: dict | None = None) -> Recipe:
    """A shipped recipe by name, or a TOML file by path; ``overrides`` = {family: {option: value}}."""
    if isinstance(recipe, Recipe):
        data = {"name": recipe.name, "summary": recipe.summary, **recipe.options}
        source = recipe.source
    else:
        files = _recipe_files()
        path = Path(recipe) if str(recipe).endswith(".toml") else files.get(str(recipe))
        if path is None or not path.is_file():
            close = difflib.get_close_matches(str(recipe), list(files), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"shipped recipes: {', '.join(sorted(files))}"
            raise ValueError(f"unknown recipe '{recipe}': {hint} (or pass a path to a .toml recipe)")
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        source = str(path)
    name, summary = data.pop("name", Path(source).stem), data.pop("summary", "")
    for family, opts in (overrides or {}).items():
        data.setdefault(family, {}).update(opts)
    return Recipe(name=name, summary=summary, options=data, source=source)


def all_rules() -> list[Rule]:
    """Every rule of every family shipped in ``rules/`` (the engine matches nodes against these)."""
    pkg = importlib.import_module("afconvert.rules")
    rules: list[Rule] = []
    for family in pkg.FAMILIES:
        rules.extend(importlib.import_module(f"afconvert.rules.{family}").RULES)
    return rules
