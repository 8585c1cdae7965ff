"""The converter: trace, infer layouts, match rules, swap modules, and judge the result.

Modules are swapped in a copy of the source model (it keeps its class, ``forward_features``,
``pretrained_cfg`` and state_dict keys); the traced graph is used to see every node, its
layout and whether it reads the image, never returned in place of the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from afconvert.converter.certify import (
    evaluating,
    measure_invariance,
    native_input_size,
    numerics_check,
    shift_check,
    size_label,
)
from afconvert.converter.info import ConversionInfo
from afconvert.converter.layout import Layout, infer_layouts
from afconvert.converter.recipe import Recipe, all_rules, families, load_recipe
from afconvert.converter.report import Finding, NotAliasFreeError, OutputFinding, Report
from afconvert.converter.rule import KEEP, Analysis, Judgement, Rule, Site, Verdict
from afconvert.converter.tracing import trace

__all__ = ["convert", "audit", "check_sizes", "converted_numerics", "back_by_measurement", "RuleConflictError",
           "DEFAULT_PROBE_SIZE"]

DEFAULT_PROBE_SIZE = (64, 64)


class RuleConflictError(ValueError):
    """Two rules claim the same target."""


def _target_name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or getattr(t, "__name__", str(t))


@dataclass
class _RuleIndex:
    rules: list[Rule]

    def __post_init__(self):
        self.by_type: dict[type, Rule] = {}
        self.by_callable: dict[int, Rule] = {}
        self.by_method: dict[str, Rule] = {}
        for rule in self.rules:
            for t in rule.targets:
                table, key = (self.by_type, t) if isinstance(t, type) else \
                    (self.by_method, t) if isinstance(t, str) else (self.by_callable, id(t))
                other = table.get(key)
                if other is not None and other is not rule:
                    raise RuleConflictError(f"rules '{other.name}' ({other.family}) and '{rule.name}' ({rule.family}) "
                                            f"both claim {_target_name(t)}; fix: one rule per target (choose between "
                                            f"ways of converting it with strategies: replace = ...)")
                table[key] = rule

    @property
    def module_types(self) -> set[type]:
        return set(self.by_type)

    def match(self, site: Site) -> Rule | None:
        n = site.node
        if n.op == "call_module":
            return self.by_type.get(type(site.module))
        if n.op == "call_method":
            return self.by_method.get(n.target)
        if n.op == "call_function":
            return self.by_callable.get(id(n.target))
        return None


def _sites(gm: fx.GraphModule, layouts: dict) -> list[Site]:
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    analysis = Analysis(gm)
    sites = []
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        flat: list = []
        fx.node.map_arg((n.args, n.kwargs), flat.append)
        inputs = [layouts.get(a.name) if isinstance(layouts.get(a.name), Layout) else None for a in flat]
        out = layouts.get(n.name)
        sites.append(Site(node=n, module=analysis.module(n.target) if n.op == "call_module" else None,
                          inputs=inputs, output=out if isinstance(out, Layout) else None,
                          reads_input=any(a in placeholders for a in flat), analysis=analysis))
    return sites


def _judge(site: Site, rule: Rule | None, recipe: Recipe) -> Judgement:
    opaque = site.analysis.opaque
    if site.node.op == "call_module" and site.node.target in opaque and site.spatial:
        return Judgement(Verdict.UNKNOWN, f"opaque: fx cannot trace inside it ({opaque[site.node.target]}); "
                                          f"its layers were not converted")
    if rule is not None:
        return rule.judge(site, recipe.for_site(rule.family, site.name)[0])
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant tensors only")
    return Judgement(Verdict.UNKNOWN, f"no rule knows '{site.op}' on a spatial map")


def _analyse(model: nn.Module, input_size: Sequence[int], in_chans: int, leaf_modules: Iterable[type],
             index: _RuleIndex) -> tuple[list[Site], list[str], list[tuple[str, fx.Node, Layout | None]]]:
    """(sites, notes, outputs): every node as a ``Site``, what the analysis noticed, and each output tensor as
    (path, the node that makes it, its layout)."""
    gm = trace(model, leaf_types=index.module_types | set(leaf_modules))
    layouts, fixed_at = infer_layouts(gm, tuple(input_size), in_chans)
    notes = [f"'{path}' ({type(model.get_submodule(path)).__name__}) kept whole: fx cannot trace it ({why})"
             for path, why in gm.afconvert_opaque.items()]
    if fixed_at:
        notes.append(f"the model runs only at input size {input_size[0]}x{input_size[1]}: node '{fixed_at}' needs a "
                     f"fixed size (layers after it were seen at one size and taken as spatially constant)")
    return _sites(gm, layouts), notes, _output_tensors(gm.graph, layouts)


def _output_tensors(graph: fx.Graph, layouts: dict) -> list[tuple[str, fx.Node, Layout | None]]:
    """Each tensor of the graph's output structure: (its path, as ``certify.output_leaves`` names it; the node
    that makes it; its layout)."""
    out: list = []

    def walk(value, path: str, node: fx.Node | None = None) -> None:
        if isinstance(value, fx.Node):
            walk(layouts.get(value.name), path, value)
        elif isinstance(value, Layout):
            out.append((path, node, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), node)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}" if path else str(i), node)
    for n in graph.nodes:
        if n.op == "output":
            walk(n.args[0], "")
    return out


def _output_findings(outputs: list, by_node: dict[str, Finding], input_size: Sequence[int]) -> list[OutputFinding]:
    """Per output tensor: its kind, stride and verdict (the worst node on its paths, or "flattened");
    ``by_node``: each graph node's finding, by node name."""
    if not outputs:
        return []
    g = _dataflow(outputs[0][1].graph)
    result = []
    for path, node, layout in outputs:
        upstream = nx.ancestors(g, node.name) | {node.name}
        worst = max((by_node[n] for n in upstream if n in by_node and by_node[n].spatial
                     and by_node[n].verdict is not Verdict.EXACT), key=lambda f: f.verdict.rank, default=None)
        name, shape = path or "output", tuple(layout.shape)
        if layout.mixed:
            result.append(OutputFinding(name, shape, "flattened", None, Verdict.NOT, "a flattened map (a dim mixes H "
                                        "and W): an input shift does not move it as a map"))
            continue
        kind, stride = "invariant", None
        if layout.spatial_dims is not None:
            hd, wd = layout.spatial_dims
            kind, stride = "equivariant", (str(Fraction(input_size[0], shape[hd])), str(Fraction(input_size[1], shape[wd])))
        if worst is None:
            reason = "every node on its paths is exactly alias-free"
            result.append(OutputFinding(name, shape, kind, stride, Verdict.EXACT, reason))
        else:
            result.append(OutputFinding(name, shape, kind, stride, worst.verdict, f"{worst.node} ({worst.op}: "
                                        f"{worst.reason})"))
    return result


def _in_chans(model: nn.Module, in_chans: int | None) -> int:
    if in_chans:
        return in_chans
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _dataflow(graph: fx.Graph) -> nx.DiGraph:
    """The graph's nodes by name, an edge from each input to the node that reads it."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.name)
        g.add_edges_from((a.name, n.name) for a in n.all_input_nodes)
    return g


def _reaching_output(graph: fx.Graph) -> set[str]:
    """Names of the nodes on some path to the output: only those can make the logits alias."""
    g = _dataflow(graph)
    out = [n.name for n in graph.nodes if n.op == "output"]
    return set().union(*(nx.ancestors(g, o) for o in out)) if out else set(g)


def _findings(sites: list[Site], index: _RuleIndex, recipe: Recipe) -> list[Finding]:
    live = _reaching_output(sites[0].node.graph) if sites else set()
    return [Finding(node=s.name, op=s.op, verdict=(j := _judge(s, index.match(s), recipe)).verdict,
                    reason=j.reason, spatial=s.spatial and s.node.name in live) for s in sites]


def audit(model: nn.Module, input_size: Sequence[int] | None = None, in_chans: int | None = None,
          check: bool = True, leaf_modules: Iterable[type] = (), shifts=None, dtype=torch.float32,
          rules: Sequence[Rule] = ()) -> Report:
    """Judge every node of ``model``: exactly alias-free, approximately, not, or unknown.

    With ``check``, the verdict is backed by the logits themselves, at ``input_size`` and at the
    model's native size (``native_input_size``): a numerics check (non-finite or exploding logits
    make the verdict ``UNSTABLE``) and, when they are stable, an empirical shift check.
    """
    input_size = tuple(input_size or DEFAULT_PROBE_SIZE)
    in_chans = _in_chans(model, in_chans)
    index = _RuleIndex(all_rules(rules))
    with evaluating(model):
        sites, notes, outputs = _analyse(model, input_size, in_chans, leaf_modules, index)
    info = getattr(model, "afconvert_info", None)
    judging = Recipe(name="", summary="", families=families(rules))  # every family's default options
    findings = _findings(sites, index, judging)
    report = Report(model=_model_name(model), recipe=info.recipe if info else None, findings=findings, notes=notes,
                    outputs=_output_findings(outputs, {s.node.name: f for s, f in zip(sites, findings)}, input_size))
    if check:
        sizes = check_sizes(model, input_size)
        report.numerics = numerics_check(model, sizes, in_chans, dtype=dtype)
        back_by_measurement(model, report, input_size, in_chans)
        if report.stable:
            kwargs = {"shifts": shifts} if shifts else {}
            report.checks = [shift_check({"model": model}, size, in_chans, dtype=dtype, **kwargs) for size in sizes
                             if report.numerics["max_abs_logit"][size_label(size)] is not None]
    return report


def check_sizes(model: nn.Module, input_size: Sequence[int]) -> list[tuple[int, int]]:
    """Where the empirical checks run: the small probe size and the model's native size."""
    return list(dict.fromkeys([tuple(int(v) for v in input_size), native_input_size(model)]))


def back_by_measurement(model: nn.Module, report: Report, input_size: Sequence[int], in_chans: int) -> None:
    """Where the analysis finds ``model`` exactly alias-free and its logits stable, measure it
    (``measure_invariance``: float64, at ``input_size``) into ``report.measurement``: a certificate is both."""
    if report.stable and report.graph_verdict is Verdict.EXACT:
        report.measurement = measure_invariance(model, input_size, in_chans)


def converted_numerics(model: nn.Module) -> dict:
    """``numerics_check`` of a converted model at its conversion probe size and its native size."""
    info = model.afconvert_info
    return numerics_check(model, check_sizes(model, info.input_size), info.in_chans)


def _rewritten_name(node: fx.Node) -> str:
    """The module path a rewritten functional call gets in the graph module."""
    return f"{node.name}_af"


def _rewrite_functional(gm: fx.GraphModule, swaps: dict, swapped: dict, functional: dict[fx.Node, nn.Module]
                        ) -> tuple[fx.GraphModule, dict[str, str]]:
    """Apply the module swaps to the traced graph module and turn each converted functional call
    (``F.relu(x)``) into a call of its replacement module, registered as ``<node>_af``."""
    for name in swapped:
        gm.set_submodule(name, swaps[name][0])
    rewritten = {}
    for node, module in functional.items():
        name = _rewritten_name(node)
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            # a replacement that ``takes_call_arguments`` is called as the function it replaces
            args = (tuple(node.args), dict(node.kwargs)) if getattr(module, "takes_call_arguments", False) \
                else ((node.args[0],), {})
            call = gm.graph.call_module(name, *args)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        target = node.target
        rewritten[name] = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten


@torch.no_grad()
def _measure(model: nn.Module, plan: list, data: torch.Tensor) -> int:
    """Feed each measuring rule's statistics (``Rule.measure``) with its site's module input (seen by a
    pre-hook, before an in-place op overwrites it) and output on ``data``, on the source model. A module
    called at several places is measured once, over all its calls. Returns how many were measured."""
    handles, seen = [], {}
    for site, rule, opts, _ in plan:
        if rule.measure is None or site.module is None or site.name in seen:
            continue
        stats = rule.measure(site, opts)
        if stats is None:
            continue
        seen[site.name] = stats
        inputs: list = []
        handles.append(site.module.register_forward_pre_hook(lambda mod, args, keep=inputs: keep.append(args[0].clone())))
        handles.append(site.module.register_forward_hook(
            lambda mod, args, out, keep=inputs, stats=stats: stats.update(keep.pop(), out)))
    try:
        p = next(model.parameters())
        for batch in torch.split(data, 8):
            model(batch.to(device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    for site, *_ in plan:
        site.stats = seen.get(site.name, site.stats)
    return len(seen)


def convert(model: nn.Module, recipe: str | Recipe = "afc", input_size: Sequence[int] | None = None,
            strict: bool = False, in_chans: int | None = None, leaf_modules: Iterable[type] = (),
            options: dict | None = None, calibration: torch.Tensor | None = None,
            check_numerics: bool = True, overrides: dict | None = None, rules: Sequence[Rule] = ()) -> nn.Module:
    """Return an alias-free copy of ``model`` (same class, same state_dict keys for kept weights).

    ``recipe``: a shipped recipe name (``afc``, ``afc-paper``, ``blurpool``, ``aps``, ``circular``) or a
    path to a TOML recipe; ``options``: per-family options on top of it, e.g. ``{"activation": {"degree":
    3}}``; ``overrides``: per-module options by name pattern, e.g. ``{"stem.*": {"replace": "keep"}}`` or
    ``{"head.*": {"activation": {"replace": "keep"}}}``; ``rules``: a user's extra rules (``Rule``; a
    target claimed twice is a ``RuleConflictError``). ``input_size``: an (H, W) the model runs at, for
    layout inference (default 64x64). ``calibration``: images (N, C, H, W) that rules measure (each
    activation's polynomial is fitted per channel to its inputs on them) and that BatchNorm
    re-estimation uses when the recipe asks. The per-layer report is ``result.afconvert_report``; with
    ``check_numerics`` it includes the converted logits' size at ``input_size`` and the native size
    (``numerics_check``; non-finite or exploding logits make the verdict ``UNSTABLE``) and, where the analysis
    finds it exact, the float64 shift measurement that backs the certificate (``back_by_measurement``; outputs
    that move make the verdict ``CONTRADICTED``). ``strict=True`` raises ``NotAliasFreeError`` naming the nodes
    that are not exactly alias-free, the sizes where the logits are unstable, or the measurement's disagreement.
    """
    rec = load_recipe(recipe, options, overrides, rules)
    input_size = tuple(input_size or DEFAULT_PROBE_SIZE)
    in_chans = _in_chans(model, in_chans)
    index = _RuleIndex(all_rules(rules))
    out = copy.deepcopy(model)
    was_training = out.training
    out.eval()
    sites, _, _ = _analyse(out, input_size, in_chans, leaf_modules, index)
    before = {id(s.node): _judge(s, index.match(s), rec) for s in sites}
    plan = [(s, r, *rec.for_site(r.family, s.name)) for s in sites if (r := index.match(s)) is not None]
    notes: list[str] = []
    if calibration is not None:
        measured = _measure(out, plan, calibration)
        notes.append(f"{measured} activation(s) fitted per channel by least squares on {len(calibration)} "
                     f"calibration images")
    swaps, functional, kept = _replacements(plan, sites, rec)
    out, swapped = _apply(out, model, sites, swaps, functional, notes)
    if swapped:
        for fam in rec.families.values():
            if fam.after_conversion is not None:
                notes.extend(fam.after_conversion(out, rec.for_family(fam.name), calibration, input_size, in_chans))
    if kept:
        patterns = sorted(set(kept.values()))
        notes.append(f"{len(kept)} node(s) kept as they are by recipe override(s) "
                     f"{', '.join(repr(p) for p in patterns)}")
    out.train(was_training)
    out.afconvert_info = ConversionInfo(rec.name, rec.to_dict(), input_size, in_chans, list(swapped),
                                        graph_module=bool(functional))
    src_before = {s.name: before[id(s.node)] for s in sites}
    src_before.update({_rewritten_name(n): before[id(n)] for n in functional})
    report = _conversion_report(out, rec, notes, swapped, kept, src_before, leaf_modules, rules)
    if check_numerics:
        report.numerics = converted_numerics(out)
        back_by_measurement(out, report, input_size, in_chans)
    out.afconvert_report = report
    if strict and (report.offenders or not report.stable or report.contradicted):
        parts = ([f"{len(report.offenders)} node(s) not exactly alias-free: {report.graph_verdict_text}"]
                 if report.offenders else []) + ([report.instability] if not report.stable else []) + \
            ([report.disagreement] if report.contradicted else [])
        raise NotAliasFreeError("strict: " + "; ".join(parts))
    return out


def _replacements(plan: list, sites: list[Site], rec: Recipe) -> tuple[dict[str, list[nn.Module]], dict[fx.Node, nn.Module],
                                                          dict[str, str]]:
    """Run each planned site's strategy: (module swaps by path, functional calls to rewrite, sites kept by an
    override and its pattern); then the families' graph passes over the swaps."""
    swaps: dict[str, list[nn.Module]] = {}
    functional: dict[fx.Node, nn.Module] = {}
    kept: dict[str, str] = {}
    for site, rule, opts, override in plan:
        site.options = opts
        if opts.replace == KEEP:
            if override is not None:
                kept[site.name] = override.pattern
            continue
        strategy = rule.strategy(opts.replace)
        new = strategy(site, opts) if strategy is not None else None
        if new is None:
            continue
        if site.module is None:  # a functional call: becomes a module call in the graph
            functional[site.node] = new
        else:
            swaps.setdefault(site.name, []).append(new)
    for fam in rec.families.values():
        for graph_pass in fam.passes:
            graph_pass(sites, swaps)
    return swaps, functional, kept


def _apply(out: nn.Module, model: nn.Module, sites: list[Site], swaps: dict, functional: dict, notes: list[str]
           ) -> tuple[nn.Module, dict[str, str]]:
    """Swap the modules in ``out`` (a copy of ``model``) and rewrite the functional calls (the result is then the
    traced graph module); returns it and {path: the class or function it replaced}."""
    swapped = {}
    for name, news in swaps.items():
        if len({repr(m) for m in news}) > 1:
            notes.append(f"'{name}' is one module called at {len(news)} places with different layouts: not converted "
                         f"(give each call its own module)")
            continue
        out.set_submodule(name, news[0])
        swapped[name] = type(model.get_submodule(name)).__name__
    if functional:
        out, rewritten = _rewrite_functional(sites[0].analysis.gm, swaps, swapped, functional)
        swapped.update(rewritten)
        notes.append(f"{len(functional)} functional call(s) rewritten as modules: the result is a torch.fx "
                     f"GraphModule traced in eval mode (its forward is the traced graph)")
    return out, swapped


def _conversion_report(out: nn.Module, rec: Recipe, notes: list[str], swapped: dict[str, str], kept: dict[str, str],
                       src_before: dict[str, Judgement], leaf_modules, rules) -> Report:
    """The converted model's audit (no checks), with what replaced what and the source op's verdict."""
    report = audit(out, out.afconvert_info.input_size, out.afconvert_info.in_chans, check=False,
                   leaf_modules=leaf_modules, rules=rules)
    report.recipe = rec.name
    report.notes.extend(notes)
    for f in report.findings:
        if f.node in swapped:
            f.op = swapped[f.node]
            f.replaced_by = type(out.get_submodule(f.node)).__name__
            f.before = src_before[f.node].verdict
        elif f.node in kept and f.verdict is not Verdict.EXACT:
            f.reason += f" (kept by recipe override '{kept[f.node]}')"
    return report
