"""What a rule is: the targets it matches, how it judges a site, and its replacement strategies.

Rules live in ``rules/`` (installed as ``afconvert.rules``), one module per layer family, each
exporting ``FAMILY`` (its name), ``Options`` (a frozen dataclass: the family's recipe options and
their only defaults) and ``RULES``, and optionally its extension points:

* ``PASSES``: graph passes, ``pass(sites, swaps)``, run after every site's strategy: they may rewrite the
  planned swaps (module path -> replacements) looking at several sites at once (the activation family fuses
  ``fc1 -> act -> fc2``);
* ``after_conversion(model, options, calibration, input_size, in_chans) -> list[str]``: called on the
  converted model when anything was replaced; returns notes for the report (the norm family re-estimates
  BatchNorm statistics when its options ask).

The engine (``afconvert.converter.engine``) matches graph
nodes to rules; a recipe (``rules/*.toml``) picks each family's strategy (``replace``) and
options, per module when it overrides them by name. Rules see the traced graph only through
``Site`` and its ``Analysis``.
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from afconvert.converter.layout import Layout
from afconvert.layers.sampling import ShiftGuarantee

__all__ = ["Verdict", "Judgement", "judge_sampler", "Analysis", "Site", "Rule", "Options", "KEEP", "DEFAULT"]

KEEP = "keep"          # the strategy every family has: leave the op as it is
DEFAULT = "default"    # the rule's first strategy


@dataclass(frozen=True)
class Options:
    """Options of a rule family. ``replace``: the strategy, a name from the rules' ``strategies``,
    ``keep``, or ``default`` (each rule's first strategy). Families subclass it with their options."""

    replace: str = DEFAULT


class Verdict(str, enum.Enum):
    """How a node treats circular shifts of its spatial input."""

    EXACT = "exact"            # commutes with every circular shift, fractional ones included
    INTEGER = "integer shifts only"  # commutes with integer circular shifts exactly, not with fractional ones
    APPROX = "approximate"     # aliases, but by a bounded / small amount
    NOT = "not alias-free"     # aliases
    UNKNOWN = "unknown"        # no rule knows this op: never certified
    CONTRADICTED = "contradicted by measurement"  # (a whole model) judged exact, but its outputs move: never certified
    UNSTABLE = "numerically unstable"  # (a whole model) non-finite or exploding logits: never certified

    @property
    def rank(self) -> int:
        return list(Verdict).index(self)


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str


_GUARANTEED = {ShiftGuarantee.INTEGER: Verdict.INTEGER, ShiftGuarantee.REDUCED: Verdict.APPROX,
               ShiftGuarantee.NONE: Verdict.NOT}


def judge_sampler(layer: nn.Module, stride, x: Layout | None = None) -> Judgement | None:
    """The verdict of a layer that down-samples by ``stride`` with a peer's sampler (one that declares its
    ``guarantee``, ``afconvert.layers.sampling``) the map ``x`` (its layout, when known); None for any other
    layer. Adaptive polyphase sampling is invariant to integer shifts only where the stride divides the map's
    size: elsewhere a shift does not permute its phases."""
    guarantee = getattr(type(layer), "guarantee", None)
    if not isinstance(guarantee, ShiftGuarantee):
        return None
    stride, size = tuple(stride), x.spatial_size if x is not None else None
    if guarantee is ShiftGuarantee.INTEGER and size is not None and any(n % s for n, s in zip(size, stride)):
        return Judgement(Verdict.NOT, f"adaptive polyphase sampling by {stride} of a {size[0]} x {size[1]} map: the "
                                      f"stride does not divide the size, so a shift does not permute the phases "
                                      f"(not invariant even to integer shifts at this input size)")
    return Judgement(_GUARANTEED[guarantee], guarantee.value.format(s=stride))


class Analysis:
    """What rules may know of the traced graph: its module, module lookup, call counts."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.call_counts = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.opaque: dict[str, str] = dict(getattr(gm, "afconvert_opaque", {}))

    def module(self, target: str) -> nn.Module:
        return self.modules[target]

    def calls(self, target: str) -> int:
        """How many graph nodes call the module at ``target``."""
        return self.call_counts.get(target, 0)


@dataclass
class Site:
    """One node of the traced graph, with what the engine knows about it."""

    node: fx.Node
    module: nn.Module | None            # for call_module nodes
    inputs: list[Layout | None]         # layouts of the tensor arguments, in order
    output: Layout | None
    reads_input: bool = False           # an argument is the model's input itself
    analysis: Analysis | None = field(default=None, repr=False)
    stats: object | None = None         # what the rule's ``measure`` collected on calibration data
    options: Options | None = None      # the options the engine converted it with (graph passes read them)

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
        return self.analysis.calls(self.node.target) if self.module is not None else 1

    def constant_args(self) -> tuple[tuple, dict] | None:
        """The call's arguments after the first (the tensor) and its keyword arguments, or None when
        one of them is itself computed in the graph (not a fixed parameter). The one parser of
        functional-call arguments."""
        rest, kwargs = tuple(self.node.args[1:]), dict(self.node.kwargs)
        if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
            return None
        return rest, kwargs

    def call_args(self, names: Sequence[str]) -> dict | None:
        """``constant_args`` by name: positional arguments after the tensor take ``names`` in order."""
        args = self.constant_args()
        return None if args is None else {**dict(zip(names, args[0])), **args[1]}

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


Strategy = Callable[[Site, Options], "nn.Module | None"]


@dataclass
class Rule:
    """Targets (module classes, matched by exact type; functions; or method names) -> judge and strategies.

    ``judge(site, options)`` says how the *existing* op treats shifts. ``strategies`` maps a name
    (what a recipe's ``replace`` picks) to ``convert(site, options)``, which returns the replacement
    module or None to keep the op; the first is the ``default``. Rules without strategies only judge.
    ``measure(site, options)``, when given, returns an object whose ``update(input, output)`` the
    engine feeds with the site's module's input and output on calibration data; it becomes
    ``site.stats`` before the strategy runs.
    """

    name: str
    family: str
    targets: tuple
    judge: Callable[[Site, Options], Judgement]
    strategies: dict[str, Strategy] = field(default_factory=dict)
    measure: Callable[[Site, Options], object | None] | None = None

    def strategy(self, name: str) -> Strategy | None:
        """The strategy a recipe's ``replace`` names (``default``: the first), or None (``keep``, or
        a strategy of another rule of the family)."""
        if name == DEFAULT:
            return next(iter(self.strategies.values()), None)
        return self.strategies.get(name)
