"""Model names, checked without importing torch: a misspelled name fails in a fraction of a second.

timm and torchvision register their models with a ``@register_model`` decorator on a function of
the model's name; scanning the installed packages' sources for those decorators lists the names
exactly as ``timm.list_models()`` / ``torchvision.models.list_models()`` do (a test keeps that
true), plus timm's deprecated aliases.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path

__all__ = ["ModelSourceError", "split_name", "registered_names", "check_name"]

LIBRARIES = ("timm", "torchvision")


class ModelSourceError(ValueError):
    """A model name, weights file or hub problem; the message names the fix."""


def split_name(name: str) -> tuple[str, str]:
    """'timm:resnet50' -> ('timm', 'resnet50'); a bare name is timm's."""
    if ":" in name:
        lib, arch = name.split(":", 1)
        if lib not in LIBRARIES:
            raise ModelSourceError(f"unknown model library '{lib}' in '{name}': use timm:NAME or torchvision:NAME")
        return lib, arch
    return "timm", name


@functools.lru_cache(maxsize=None)
def registered_names(library: str) -> frozenset[str]:
    """Every model name ``library`` registers (and timm's deprecated aliases), read from its sources."""
    spec = importlib.util.find_spec(library)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"{library} is not installed; fix: pip install {library}")
    root = Path(list(spec.submodule_search_locations)[0]) / "models"
    names: set[str] = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"@register_model\b(\((?P<args>[^)]*)\))?", text):
            explicit = re.search(r"name\s*=\s*['\"](\w+)['\"]", m.group("args") or "")
            func = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M).search(text, m.end())
            if explicit:
                names.add(explicit.group(1))
            elif func:
                names.add(func.group(1))
        for block in re.findall(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", text, flags=re.S):
            names.update(re.findall(r"['\"]([\w.]+)['\"]\s*:", block))
    return frozenset(names)


def check_name(name: str) -> tuple[str, str]:
    """(library, architecture) of a known model name; else a one-line error with close names."""
    library, arch = split_name(name)
    known = registered_names(library)
    if arch.split(".")[0] in known:  # timm accepts 'name.pretrained_tag'
        return library, arch
    close = difflib.get_close_matches(arch, sorted(known), n=4, cutoff=0.6)
    where = "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"
    hint = f"did you mean {', '.join(close)}?" if close else f"see {where}"
    raise ModelSourceError(f"unknown {library} model '{arch}': {hint}")
