"""Graph passes: rewrites of the conversion plan that look at several sites at once.

``fuse_linear_around_activations``: ideal up-/down-sampling U, D are linear and per channel, so
they commute with a pointwise linear map W (a Linear over channels-last maps): an alias-free
activation between two Linears, ``fc1 -> D(p(U .)) -> fc2``, is the same function as
``D(fc2(p(fc1(U .))))``, with the FFTs on the block's C channels instead of its expanded hidden
channels (ConvNeXt's MLP: 4C). The official ConvNeXt-AFC builds its MLP this way.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from afconvert.converter.rule import Site
from afconvert.layers.poly import AliasFreePolyActivation
from afconvert.layers.resample import DownsampledLinear, HighRatePolyActivation, UpsampledLinear

__all__ = ["linear_neighbours", "fuse_linear_around_activations", "PASSES"]

# pointwise modules that may stand between an activation and the next Linear (timm's Mlp: drop1, norm)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def linear_neighbours(site: Site) -> tuple[fx.Node, fx.Node] | None:
    """(fc1, fc2) call_module nodes of Linears when the site is fc1 -> act -> [identity/dropout] -> fc2,
    each used once, so the pair can carry the up- and down-sampling."""
    node, analysis = site.node, site.analysis
    before = node.args[0] if node.args else None
    if not (isinstance(before, fx.Node) and before.op == "call_module" and len(before.users) == 1):
        return None
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_module" or len(nxt.args) != 1:
            return None
        if isinstance(analysis.module(nxt.target), _PASS_THROUGH):
            cur = nxt
            continue
        linear = (nn.Linear, UpsampledLinear, DownsampledLinear)
        both = isinstance(analysis.module(before.target), linear) and isinstance(analysis.module(nxt.target), linear)
        return (before, nxt) if both else None
    return None


def fuse_linear_around_activations(sites: list[Site], swaps: dict[str, list[nn.Module]]) -> None:
    """For each activation converted to an ``AliasFreePolyActivation`` on channels-last maps between two
    Linears, when its options say ``fuse_linear``: run the up-sampling before fc1 and the down-sampling
    after fc2 instead (exact). Rewrites ``swaps`` (module path -> replacements) in place."""
    for site in sites:
        new = swaps.get(site.name)
        x = site.x
        if site.module is None or not new or type(new[0]) is not AliasFreePolyActivation or len(new) != 1:
            continue
        if not getattr(site.options, "fuse_linear", False) or x is None or x.channel_dim != len(x.shape) - 1:
            continue
        pair = linear_neighbours(site)
        if pair is None or any(n.target in swaps for n in pair):
            continue
        act = new[0]
        fc1, fc2 = (site.analysis.module(n.target) for n in pair)
        swaps[pair[0].target] = [UpsampledLinear.from_linear(fc1, act.up, x.spatial_dims)]
        swaps[site.name] = [HighRatePolyActivation.from_poly(act)]
        swaps[pair[1].target] = [DownsampledLinear.from_linear(fc2, act.up, x.spatial_dims)]


PASSES = (fuse_linear_around_activations,)
