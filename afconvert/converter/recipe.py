"""Recipes: TOML files in ``rules/`` choosing, per rule family, a replacement strategy and its options.

    name = "afc"
    summary = "..."
    [activation]                 # a family: its Options dataclass (rules/activation.py) is the schema
    replace = "poly"             # a strategy of the family's rules, or "keep"
    degree = 2
    [overrides."stem.*"]         # modules (or graph nodes) whose name matches the pattern ...
    replace = "keep"             # ... keep every family's op as it is
    [overrides."head.*".activation]
    replace = "keep"             # ... or set one family's options there

A recipe may start from another: ``base = "afc"`` (a shipped name or a .toml path) is afc with the file's
tables merged on top, option by option; its name and summary are its own.

Every family declares its options once, as a frozen dataclass whose defaults are the only defaults;
a recipe that names an unknown family, option, strategy or choice is refused with the close valid
names. Later overrides win over earlier ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from afconvert import rules
from afconvert.converter.rule import DEFAULT, KEEP, Options, Rule

__all__ = ["Recipe", "RecipeError", "Family", "Override", "load_recipe", "list_recipes", "all_rules", "families"]


class RecipeError(ValueError):
    """A recipe that names something no family knows; the message names the valid choices."""


@dataclass(frozen=True)
class Family:
    """A rule family: its name, its options (a frozen dataclass), its rules, its graph passes and its hook
    after conversion (see ``afconvert.converter.rule``), and the rules module."""

    name: str
    options: type
    rules: tuple[Rule, ...]
    module: types.ModuleType | None = None
    passes: tuple[typing.Callable, ...] = ()
    after_conversion: typing.Callable | None = None

    @property
    def strategies(self) -> tuple[str, ...]:
        names = dict.fromkeys(n for r in self.rules for n in r.strategies)
        return (DEFAULT, *names, KEEP)


@functools.lru_cache(maxsize=None)
def _shipped_families() -> tuple[Family, ...]:
    return tuple(Family(mod.FAMILY, getattr(mod, "Options", Options), tuple(mod.RULES), mod,
                        tuple(getattr(mod, "PASSES", ())), getattr(mod, "after_conversion", None))
                 for mod in rules.FAMILIES)


def families(extra_rules: typing.Iterable[Rule] = ()) -> dict[str, Family]:
    """Every shipped family (``afconvert.rules``), plus the families of ``extra_rules`` (a user's rules:
    added to a shipped family of the same name, or a family of their own with plain ``Options``)."""
    out = {f.name: f for f in _shipped_families()}
    for rule in extra_rules:
        fam = out.get(rule.family) or Family(rule.family, Options, ())
        out[rule.family] = dataclasses.replace(fam, rules=fam.rules + (rule,))
    return out


def all_rules(extra_rules: typing.Iterable[Rule] = ()) -> list[Rule]:
    """Every rule of every family (the engine matches nodes against these)."""
    return [r for f in families(extra_rules).values() for r in f.rules]


def _close(word: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(word, valid, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(valid)}"


def _check_value(where: str, key: str, value, hint, fld: dataclasses.Field):
    """``value`` as the option's type (TOML lists become tuples), or a RecipeError."""
    origin = typing.get_origin(hint)
    choices = fld.metadata.get("choices")
    if hint is bool or hint is int or hint is str:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    elif dataclasses.is_dataclass(hint) or (origin in (typing.Union, types.UnionType) and value is not None):
        sub = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if not isinstance(value, dict):
            raise RecipeError(f"recipe {where}: '{key}' must be a table of {', '.join(f.name for f in dataclasses.fields(sub))}")
        return _build(sub, value, f"{where}.{key}")
    else:
        ok = True
    if not ok:
        raise RecipeError(f"recipe {where}: '{key}' = {value!r} is not a {getattr(hint, '__name__', hint)}")
    if choices and value not in choices:
        raise RecipeError(f"recipe {where}: '{key}' = {value!r}: {_close(str(value), choices)}")
    return value


def _build(cls: type, values: dict, where: str, base=None):
    """An instance of the options dataclass ``cls`` from ``values`` (on top of ``base``), checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(f"recipe {where}: unknown option '{key}': {_close(key, fields)}")
        checked[key] = _check_value(where, key, value, hints[key], fields[key])
    try:
        return dataclasses.replace(base, **checked) if base is not None else cls(**checked)
    except ValueError as exc:   # an options class's own check of how its options combine (__post_init__)
        raise RecipeError(f"recipe {where}: {exc}") from None


def _plain(obj):
    """Options as plain data (dicts, lists, numbers, strings) for checkpoints and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Override:
    """Options for the modules whose name matches ``pattern`` (fnmatch): of one family, or (family None)
    ``replace = "keep"`` for every family."""

    pattern: str
    family: str | None
    values: dict

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    options: dict = field(default_factory=dict)     # family -> its Options instance
    overrides: tuple[Override, ...] = ()
    source: str = ""
    families: dict = field(default_factory=dict, repr=False, compare=False)

    def for_family(self, family: str) -> Options:
        if family in self.options:
            return self.options[family]
        fam = self.families.get(family)
        return fam.options() if fam is not None else Options()

    def for_site(self, family: str, name: str) -> tuple[Options, Override | None]:
        """The family's options at the module or node ``name``, and the last override that changed them."""
        opts, used = self.for_family(family), None
        for o in self.overrides:
            if o.matches(name) and o.family in (None, family):
                opts, used = dataclasses.replace(opts, **o.values), o
        return opts, used

    def to_dict(self) -> dict:
        """Plain data: {family: {option: value}} and "overrides": {pattern: {...}} (what a checkpoint keeps)."""
        out = {fam: _plain(opts) for fam, opts in self.options.items()}
        overrides: dict = {}
        for o in self.overrides:
            entry = overrides.setdefault(o.pattern, {})
            (entry if o.family is None else entry.setdefault(o.family, {})).update(_plain(o.values))
        if overrides:
            out["overrides"] = overrides
        return out


def _recipe_files() -> dict[str, Path]:
    root = resources.files("afconvert.rules")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line summary, for every recipe shipped in ``rules/``."""
    return {name: load_recipe(name).summary for name in sorted(_recipe_files())}


def _overrides(table: dict, fams: dict[str, Family], where: str) -> list[Override]:
    out = []
    for pattern, spec in table.items():
        if not isinstance(spec, dict):
            raise RecipeError(f"recipe {where}: overrides.'{pattern}' must be a table")
        for key, value in spec.items():
            at = f"{where} overrides.'{pattern}'"
            if key == "replace":
                if value != KEEP:
                    raise RecipeError(f"recipe {at}: replace = {value!r} for every family: only \"keep\" is; set "
                                      f"another strategy per family ([overrides.'{pattern}'.FAMILY])")
                out.append(Override(pattern, None, {"replace": KEEP}))
            elif key in fams and isinstance(value, dict):
                checked = _build(fams[key].options, value, f"{at}.{key}", fams[key].options())
                _check_strategy(fams[key], checked.replace, f"{at}.{key}")
                out.append(Override(pattern, key, {k: getattr(checked, k) for k in value}))
            else:
                raise RecipeError(f"recipe {at}: unknown key '{key}': {_close(key, ['replace', *fams])}")
    return out


def _merged(base: dict, top: dict) -> dict:
    """``top`` on ``base``: tables merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_toml(recipe: "str | Path", seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """(data, path) of a shipped recipe by name or a .toml path, its ``base`` merged under it."""
    files = _recipe_files()
    path = Path(recipe) if str(recipe).endswith(".toml") else files.get(str(recipe))
    if path is None or not path.is_file():
        raise RecipeError(f"unknown recipe '{recipe}': {_close(str(recipe), files)} (or pass a path to a .toml "
                          f"recipe)")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path}: not valid TOML ({exc})") from None
    key = str(path.resolve())
    if key in seen:
        raise RecipeError(f"recipe {path}: base recipes form a cycle; fix: remove one 'base ='")
    return _with_base(data, path, (*seen, key)), str(path)


def _with_base(data: dict, path: Path | None, seen: tuple[str, ...] = ()) -> dict:
    """``data`` merged on the recipe its ``base`` names (a shipped name, or a .toml path, relative to ``path``
    when there is one); ``name`` and ``summary`` stay ``data``'s own."""
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"recipe {path or data.get('name', '(data)')}: base = {base!r} must be a recipe name or a "
                          f".toml path")
    if path is not None and base.endswith(".toml") and not Path(base).is_absolute():
        base = str(path.parent / base)
    below, _ = _read_toml(base, seen)
    below = {k: v for k, v in below.items() if k not in ("name", "summary")}
    return _merged(below, data)


def _check_strategy(fam: Family, name: str, where: str) -> None:
    if name not in fam.strategies:
        raise RecipeError(f"recipe {where}: replace = {name!r} is no strategy of family '{fam.name}': "
                          f"{_close(name, fam.strategies)}")


def load_recipe(recipe: "str | Path | Recipe | dict", options: dict | None = None, overrides: dict | None = None,
                rules: typing.Iterable[Rule] = ()) -> Recipe:
    """A shipped recipe by name, a TOML file by path, plain data (``Recipe.to_dict``), or a Recipe;
    ``options`` = {family: {option: value}} and ``overrides`` = {pattern: {...}} on top of it;
    ``rules``: a user's extra rules (their families become valid sections)."""
    fams = families(rules)
    if isinstance(recipe, Recipe):
        data, source = {"name": recipe.name, "summary": recipe.summary, **recipe.to_dict()}, recipe.source
    elif isinstance(recipe, dict):
        data, source = _with_base(recipe, None), "(data)"
    else:
        data, source = _read_toml(recipe)
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    name, summary = data.pop("name", Path(source).stem), data.pop("summary", "")
    table = dict(data.pop("overrides", {}))
    table.update(overrides or {})
    for family, opts in (options or {}).items():
        data.setdefault(family, {}).update(opts)
    where = Path(source).name if source != "(data)" else f"'{name}'"
    parsed = {}
    for family, values in data.items():
        if family not in fams or not isinstance(values, dict):
            raise RecipeError(f"recipe {where}: unknown section '[{family}]': {_close(family, [*fams, 'overrides'])}")
        parsed[family] = _build(fams[family].options, values, f"{where} [{family}]")
        _check_strategy(fams[family], parsed[family].replace, f"{where} [{family}]")
    return Recipe(name=name, summary=summary, options=parsed, overrides=tuple(_overrides(table, fams, where)),
                  source=source, families=fams)
