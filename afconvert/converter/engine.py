"""The converter: trace, infer layouts, match rules, swap modules, and judge the result.

Modules are swapped in a copy of the source model (it keeps its class, ``forward_features``,
``pretrained_cfg`` and state_dict keys); the traced graph is used to see every node, its
layout and whether it reads the image, never returned in place of the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from afconvert.converter.calibrate import calibration_batches, recalibrate_batchnorm
from afconvert.converter.certify import (
    native_input_size,
    numerics_check,
    shift_check,
    size_label,
)
from afconvert.converter.layout import Layout, infer_layouts
from afconvert.converter.recipe import Recipe, all_rules, load_recipe
from afconvert.converter.report import Finding, NotAliasFreeError, Report
from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.converter.tracing import trace
from afconvert.layers.poly import PolyFit, scale_dims

__all__ = ["convert", "audit", "check_sizes", "converted_numerics", "DEFAULT_PROBE_SIZE"]

DEFAULT_PROBE_SIZE = (64, 64)


@dataclass
class _RuleIndex:
    rules: list[Rule]

    def __post_init__(self):
        self.by_type: dict[type, Rule] = {}
        self.by_callable: dict[int, Rule] = {}
        self.by_method: dict[str, Rule] = {}
        for rule in self.rules:
            for t in rule.targets:
                if isinstance(t, type):
                    self.by_type[t] = rule
                elif isinstance(t, str):
                    self.by_method[t] = rule
                else:
                    self.by_callable[id(t)] = rule

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
    sites = []
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        flat: list = []
        fx.node.map_arg((n.args, n.kwargs), flat.append)
        inputs = [layouts.get(a.name) if isinstance(layouts.get(a.name), Layout) else None for a in flat]
        out = layouts.get(n.name)
        sites.append(Site(node=n, module=gm.get_submodule(n.target) if n.op == "call_module" else None,
                          inputs=inputs, output=out if isinstance(out, Layout) else None,
                          reads_input=any(a in placeholders for a in flat)))
    return sites


def _judge(site: Site, rule: Rule | None, recipe: Recipe | None) -> Judgement:
    opaque = getattr(site.node.graph.owning_module, "afconvert_opaque", {})
    if site.node.op == "call_module" and site.node.target in opaque and site.spatial:
        return Judgement(Verdict.UNKNOWN, f"opaque: fx cannot trace inside it ({opaque[site.node.target]}); "
                                          f"its layers were not converted")
    if rule is not None:
        return rule.judge(site, recipe.for_family(rule.family) if recipe else {})
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant tensors only")
    return Judgement(Verdict.UNKNOWN, f"no rule knows '{site.op}' on a spatial map")


def _analyse(model: nn.Module, input_size: Sequence[int], in_chans: int, leaf_modules: Iterable[type],
             index: _RuleIndex) -> tuple[list[Site], list[str]]:
    gm = trace(model, leaf_types=index.module_types | set(leaf_modules))
    layouts, fixed_at = infer_layouts(gm, tuple(input_size), in_chans)
    notes = [f"'{path}' ({type(model.get_submodule(path)).__name__}) kept whole: fx cannot trace it ({why})"
             for path, why in gm.afconvert_opaque.items()]
    if fixed_at:
        notes.append(f"the model runs only at input size {input_size[0]}x{input_size[1]}: node '{fixed_at}' needs a "
                     f"fixed size (layers after it were seen at one size and taken as spatially constant)")
    return _sites(gm, layouts), notes


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


def _reaching_output(graph: fx.Graph) -> set[str]:
    """Names of the nodes on some path to the output: only those can make the logits alias."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.name)
        g.add_edges_from((a.name, n.name) for a in n.all_input_nodes)
    out = [n.name for n in graph.nodes if n.op == "output"]
    return set().union(*(nx.ancestors(g, o) for o in out)) if out else set(g)


def _findings(sites: list[Site], index: _RuleIndex, recipe: Recipe | None) -> list[Finding]:
    live = _reaching_output(sites[0].node.graph) if sites else set()
    return [Finding(node=s.name, op=s.op, verdict=(j := _judge(s, index.match(s), recipe)).verdict,
                    reason=j.reason, spatial=s.spatial and s.node.name in live) for s in sites]


def audit(model: nn.Module, input_size: Sequence[int] | None = None, in_chans: int | None = None,
          check: bool = True, leaf_modules: Iterable[type] = (), shifts=None, dtype=torch.float32) -> Report:
    """Judge every node of ``model``: exactly alias-free, approximately, not, or unknown.

    With ``check``, the verdict is backed by the logits themselves, at ``input_size`` and at the
    model's native size (``native_input_size``): a numerics check (non-finite or exploding logits
    make the verdict ``UNSTABLE``) and, when they are stable, an empirical shift check.
    """
    input_size = tuple(input_size or DEFAULT_PROBE_SIZE)
    in_chans = _in_chans(model, in_chans)
    index = _RuleIndex(all_rules())
    was_training = model.training
    model.eval()
    try:
        sites, notes = _analyse(model, input_size, in_chans, leaf_modules, index)
    finally:
        model.train(was_training)
    info = getattr(model, "afconvert_info", {}) or {}
    report = Report(model=_model_name(model), recipe=info.get("recipe"), findings=_findings(sites, index, None),
                    notes=notes)
    if check:
        sizes = check_sizes(model, input_size)
        report.numerics = numerics_check(model, sizes, in_chans, dtype=dtype)
        if report.stable:
            kwargs = {"shifts": shifts} if shifts else {}
            report.checks = [shift_check({"model": model}, size, in_chans, dtype=dtype, **kwargs) for size in sizes
                             if report.numerics["max_abs_logit"][size_label(size)] is not None]
    return report


def check_sizes(model: nn.Module, input_size: Sequence[int]) -> list[tuple[int, int]]:
    """Where the empirical checks run: the small probe size and the model's native size."""
    return list(dict.fromkeys([tuple(int(v) for v in input_size), native_input_size(model)]))


def converted_numerics(model: nn.Module) -> dict:
    """``numerics_check`` of a converted model at its conversion probe size and its native size."""
    info = model.afconvert_info
    return numerics_check(model, check_sizes(model, info["input_size"]), info["in_chans"])


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
            call = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        target = node.target
        rewritten[name] = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten


@torch.no_grad()
def _measure_activations(model: nn.Module, sites: list[Site], data: torch.Tensor, options: dict) -> int:
    """For each activation site, the least-squares statistics (``PolyFit``) of its polynomial
    against the source activation on ``data``: its input (seen by a pre-hook, before an in-place
    activation overwrites it) and its output, on the source model. Returns how many were measured."""
    degree, normalize = int(options.get("degree", 2)), str(options.get("normalize", "none"))
    handles, seen = [], {}
    for site in sites:
        x = site.x
        if site.module is None or x is None or x.channel_dim is None or x.spatial_dims is None:
            continue
        if site.name in seen:  # one module called at several places: one shared fit
            continue
        dims = scale_dims(normalize, x.spatial_dims, x.channel_dim)
        fit = seen[site.name] = PolyFit(degree, x.channel_dim, dims, shared=site.calls > 1)
        inputs = []
        handles.append(site.module.register_forward_pre_hook(lambda mod, args, keep=inputs: keep.append(args[0].clone())))
        handles.append(site.module.register_forward_hook(
            lambda mod, args, out, keep=inputs, fit=fit: fit.update(keep.pop(), out)))
    try:
        p = next(model.parameters())
        for batch in torch.split(data, 8):
            model(batch.to(device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        if site.name in seen:
            site.stats = seen[site.name]
    return len(seen)


def convert(model: nn.Module, recipe: str | Recipe = "afc", input_size: Sequence[int] | None = None,
            strict: bool = False, in_chans: int | None = None, leaf_modules: Iterable[type] = (),
            options: dict | None = None, calibration: torch.Tensor | None = None,
            check_numerics: bool = True) -> nn.Module:
    """Return an alias-free copy of ``model`` (same class, same state_dict keys for kept weights).

    ``recipe``: a shipped recipe name (``afc``, ``afc-paper``) or a path to a TOML recipe;
    ``options``: per-family overrides, e.g. ``{"activation": {"degree": 3}}``. ``input_size``:
    an (H, W) the model runs at, for layout inference (default 64x64). ``calibration``: images
    (N, C, H, W) for re-estimating BatchNorm statistics when the recipe asks (``norm.recalibrate``;
    random inputs otherwise) and for fitting each activation's polynomial per channel to the
    measured distribution of its input. The per-layer report is
    ``result.afconvert_report``; with ``check_numerics`` it includes the converted logits' size
    at ``input_size`` and the native size (``numerics_check``; non-finite or exploding logits make
    the verdict ``UNSTABLE``). ``strict=True`` raises ``NotAliasFreeError`` naming the nodes
    that are not exactly alias-free, or the sizes where the logits are unstable.
    """
    rec = load_recipe(recipe, options)
    input_size = tuple(input_size or DEFAULT_PROBE_SIZE)
    in_chans = _in_chans(model, in_chans)
    index = _RuleIndex(all_rules())
    out = copy.deepcopy(model)
    was_training = out.training
    out.eval()
    sites, _ = _analyse(out, input_size, in_chans, leaf_modules, index)
    before = {id(s.node): _judge(s, index.match(s), rec) for s in sites}
    notes: list[str] = []
    if calibration is not None:
        measured = _measure_activations(out, [s for s in sites if getattr(index.match(s), "family", None) == "activation"],
                                        calibration, rec.for_family("activation"))
        notes.append(f"{measured} activation(s) fitted per channel by least squares on {len(calibration)} "
                     f"calibration images")

    swaps: dict[str, list[nn.Module]] = {}
    functional: dict[fx.Node, nn.Module] = {}
    for site in sites:
        rule = index.match(site)
        if rule is None or rule.convert is None:
            continue
        new = rule.convert(site, rec.for_family(rule.family))
        if new is None:
            continue
        if site.module is None:  # a functional call: becomes a module call in the graph
            functional[site.node] = new
            continue
        if isinstance(new, nn.Module):
            new = {site.node.target: new}
        for name, module in new.items():  # a rule may replace the site's neighbours too
            swaps.setdefault(name, []).append(module)
    swapped = {}
    for name, news in swaps.items():
        if len({repr(m) for m in news}) > 1:
            notes.append(f"'{name}' is one module called at {len(news)} places with different layouts: not converted "
                         f"(give each call its own module)")
            continue
        out.set_submodule(name, news[0])
        swapped[name] = type(model.get_submodule(name)).__name__
    if functional:
        out, rewritten = _rewrite_functional(sites[0].node.graph.owning_module, swaps, swapped, functional)
        swapped.update(rewritten)
        notes.append(f"{len(functional)} functional call(s) rewritten as modules: the result is a torch.fx "
                     f"GraphModule traced in eval mode (its forward is the traced graph)")

    norm_opts = rec.for_family("norm")
    if norm_opts.get("recalibrate", False) and swapped:
        count = recalibrate_batchnorm(out, calibration_batches(calibration, input_size, in_chans))
        if count:
            source = f"{len(calibration)} calibration images" if calibration is not None else \
                f"random inputs at {input_size[0]}x{input_size[1]} (pass calibration images, --calibration DIR, " \
                f"for real statistics)"
            notes.append(f"{count} BatchNorm layers re-estimated for the converted activations on {source}")
    out.train(was_training)
    out.afconvert_info = {"recipe": rec.name, "options": rec.options, "input_size": list(input_size),
                          "in_chans": in_chans}
    report = audit(out, input_size, in_chans, check=False, leaf_modules=leaf_modules)
    report.recipe = rec.name
    report.notes.extend(notes)
    src_before = {s.name: before[id(s.node)] for s in sites}
    src_before.update({_rewritten_name(n): before[id(n)] for n in functional})
    for f in report.findings:
        if f.node in swapped:
            f.op = swapped[f.node]
            f.replaced_by = type(out.get_submodule(f.node)).__name__
            f.before = src_before[f.node].verdict
    if check_numerics:
        report.numerics = converted_numerics(out)
    out.afconvert_report = report
    if strict and (report.offenders or not report.stable):
        parts = ([f"{len(report.offenders)} node(s) not exactly alias-free: {report.graph_verdict_text}"]
                 if report.offenders else []) + ([report.instability] if not report.stable else [])
        raise NotAliasFreeError("strict: " + "; ".join(parts))
    return out
