"""What a rule is: the targets it matches, how it judges a site, and what it replaces it with.

Rules live in ``rules/`` (installed as ``afconvert.rules``), one module per layer family, each
exporting ``RULES``. The engine (``afconvert.converter.engine``) matches graph nodes to rules; a recipe
(``rules/*.toml``) chooses the options each rule family converts with.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from afconvert.converter.layout import Layout

__all__ = ["Verdict", "Judgement", "Site", "Rule"]


class Verdict(str, enum.Enum):
    """How a node treats circular shifts of its spatial input."""

    EXACT = "exact"            # commutes with every circular shift, fractional ones included
    APPROX = "approximate"     # aliases, but by a bounded / small amount
    NOT = "not alias-free"     # aliases
    UNKNOWN = "unknown"        # no rule knows this op: never certified
    UNSTABLE = "numerically unstable"  # (a whole model) non-finite or exploding logits: never certified

    @property
    def rank(self) -> int:
        return {"exact": 0, "approximate": 1, "not alias-free": 2, "unknown": 3, "numerically unstable": 4}[self.value]


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str


@dataclass
class Site:
    """One node of the traced graph, with what the engine knows about it."""

    node: fx.Node
    module: nn.Module | None            # for call_module nodes
    inputs: list[Layout | None]         # layouts of the tensor arguments, in order
    output: Layout | None
    reads_input: bool = False           # an argument is the model's input itself
    stats: object | None = None         # what the engine measured on calibration data (activations: a PolyFit)

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    @property
    def op(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        t = self.node.target
        return t if isinstance(t, str) else getattr(t, "__name__", str(t))

    @property
    def calls(self) -> int:
        """How many graph nodes call this site's module (1 for functional calls)."""
        if self.module is None:
            return 1
        return sum(1 for n in self.node.graph.nodes if n.op == "call_module" and n.target == self.node.target)

    @property
    def x(self) -> Layout | None:
        """The layout of the first tensor argument."""
        return next((lay for lay in self.inputs if isinstance(lay, Layout)), None)

    @property
    def spatial(self) -> bool:
        """Any tensor argument or the output varies over space."""
        lays = [lay for lay in self.inputs if isinstance(lay, Layout)]
        if isinstance(self.output, Layout):
            lays.append(self.output)
        return any(lay.is_spatial for lay in lays)


@dataclass
class Rule:
    """Targets (module classes, matched by exact type; functions; or method names) -> judge/convert.

    ``judge(site, options)`` says how the *existing* op treats shifts. ``convert(site, options)``
    returns a replacement module, or {module path: replacement} when it also replaces neighbours
    (the site's own path included), or None to keep the op. Rules without ``convert`` only judge.
    """

    name: str
    family: str
    targets: tuple
    judge: Callable[[Site, dict], Judgement]
    convert: Callable[[Site, dict], "nn.Module | dict[str, nn.Module] | None"] | None = None
