"""Structural and linear ops: exact when they act on channels and never mix or sample space.

* Sums, differences, concatenation, dropout (identity at eval), layer scale, permutes and
  reshapes that keep H and W as separate dims: linear and pointwise in space, exact.
* A product is exact when at most one factor varies over space (a gate, a layer scale); the
  product of two spatial maps is a quadratic nonlinearity at the input rate: it aliases.
* Linear layers act pointwise on channels-last maps (exact); on a flattened map (a VGG head)
  they weigh each position differently: not shift-invariant.
* A mean over both spatial dims (global average pooling) keeps the DC bin only: exactly
  invariant. A global max is invariant to integer shifts only. An L2 norm over H and W (global
  response norm) is invariant by Parseval.
* Indexing is exact when it selects channels or batch items and keeps H and W whole; slicing or
  striding a spatial dim samples the map: not alias-free.
* Stochastic depth drops whole samples (identity at eval): exact.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d
from torchvision.ops import StochasticDepth, stochastic_depth

from afconvert.converter.rule import Judgement, Rule, Site, Verdict
from afconvert.layers.resample import DownsampledLinear, UpsampledLinear

FAMILY = "structural"   # judges only: these ops are kept (their Options have only replace)

EXACT_LINEAR = (operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.cat,
                torch.stack, "add", "sub", "add_", "neg", "contiguous", "clone", "to", "float", "type_as",
                "chunk", "split", torch.chunk, torch.split, nn.Identity, nn.Dropout, nn.Dropout2d,
                DropPath, F.dropout, StochasticDepth, stochastic_depth)
INDEXING = (operator.getitem,)
SHAPE_OPS = ("permute", "reshape", "view", "flatten", "transpose", "squeeze", "unsqueeze", torch.flatten,
             torch.permute, torch.reshape, torch.transpose, nn.Flatten)
PRODUCTS = (operator.mul, torch.mul, "mul", "mul_", torch.addcmul, "addcmul")
SPATIAL_NORMS = ("norm", torch.norm, torch.linalg.vector_norm)
QUOTIENTS = (operator.truediv, torch.div, "div", "div_")
SPATIAL_MEANS = ("mean", torch.mean)
METADATA = ("size", "dim", getattr, "ndim")


def _judge_linear_op(site: Site, options) -> Judgement:
    if site.output is not None and getattr(site.output, "mixed", False) and not _all_mixed_inputs(site):
        return Judgement(Verdict.NOT, "mixes spatial dims into one (flattens the map)")
    resized = _resized(site)
    if resized:
        return Judgement(Verdict.NOT, resized)
    positional = _positional_operand(site)
    if positional:
        return Judgement(Verdict.NOT, positional)
    return Judgement(Verdict.EXACT, "linear, pointwise in space")


def _split_dim(site: Site) -> int | None:
    """The dim a chunk / split / cat / stack acts on (its ``dim`` argument; 0 when not given), or None when it
    is computed in the graph."""
    args = site.node.args
    position = 1 if site.op in ("cat", "stack") else 2
    dim = site.node.kwargs.get("dim", args[position] if len(args) > position else 0)
    return dim if isinstance(dim, int) else None


def _resized(site: Site) -> str:
    """Why an op that joins or splits tensors changes a spatial dim's length (cuts or extends the map), or ''."""
    if site.op in ("chunk", "split", "cat", "stack"):
        lay = site.output if site.op in ("cat", "stack") else site.x
        if lay is None:
            return ""
        dim = _split_dim(site)
        if dim is None:
            return f"{site.op} along a computed dim: may cut or extend a spatial dim"
        if site.op != "stack" and -len(lay.roles) <= dim < len(lay.roles) and lay.roles[dim]:
            verb = "joins maps" if site.op == "cat" else "cuts the map"
            return f"{site.op} along spatial dim {dim % len(lay.roles)} ({lay.roles[dim]}): {verb}, not one period"
    return ""


def _positional_operand(site: Site) -> str:
    """Why an elementwise op with a fixed operand that varies along a spatial dim (a positional embedding, a
    per-position weight) is not shift-equivariant, or ''."""
    out = site.output
    if out is None or not out.is_spatial:
        return ""
    for lay in site.inputs:
        if lay is None or (lay.is_spatial and not lay.fixed):
            continue
        off = len(out.roles) - len(lay.shape)
        for d, n in enumerate(lay.shape):
            if n > 1 and 0 <= d + off < len(out.roles) and out.roles[d + off]:
                return (f"an operand of shape {tuple(lay.shape)} that does not move with the input varies along "
                        f"spatial dim {d + off} (a positional embedding or per-position weight): not shift-equivariant")
    return ""


def _all_mixed_inputs(site: Site) -> bool:
    lays = [lay for lay in site.inputs if lay is not None and hasattr(lay, "mixed")]
    return bool(lays) and all(lay.mixed for lay in lays)


def _judge_shape(site: Site, options) -> Judgement:
    out = site.output
    if out is not None and hasattr(out, "mixed") and out.mixed:
        return Judgement(Verdict.NOT, "a flattened map in a fully connected head: H and W merged or split, later layers "
                                      "see positions, not a map")
    return Judgement(Verdict.EXACT, "layout change, H and W kept as dims")


def _judge_product(site: Site, options) -> Judgement:
    positional = _positional_operand(site)
    if positional:
        return Judgement(Verdict.NOT, positional)
    factors = site.inputs[1:] if site.op == "addcmul" else site.inputs  # addcmul(c, a, b) = c + a * b
    spatial = [lay for lay in factors if lay is not None and hasattr(lay, "is_spatial") and lay.is_spatial]
    if len(spatial) <= 1:
        return Judgement(Verdict.EXACT, "product with a spatially constant factor (gate or scale)")
    return Judgement(Verdict.INTEGER, "product of two spatial maps: a quadratic at the input rate aliases "
                                      "(pointwise: exact for integer shifts only)")


def _judge_quotient(site: Site, options) -> Judgement:
    positional = _positional_operand(site)
    if positional:
        return Judgement(Verdict.NOT, positional)
    divisor = site.inputs[1] if len(site.inputs) > 1 else None
    if divisor is None or not getattr(divisor, "is_spatial", False):
        return Judgement(Verdict.EXACT, "division by a spatially constant value")
    return Judgement(Verdict.INTEGER, "division by a spatial map: a pointwise nonlinearity (exact for integer "
                                      "shifts only)")


def _judge_indexing(site: Site, options) -> Judgement:
    x, index = site.x, site.node.args[1] if len(site.node.args) > 1 else None
    if x is None or not x.is_spatial or not isinstance(index, tuple):
        return Judgement(Verdict.EXACT, "selects items of a sequence or along a non-spatial dim")
    for dim, idx in enumerate(index):
        if idx is Ellipsis:
            break  # dims after an ellipsis: counted from the end, checked below
        if dim < len(x.roles) and x.roles[dim] and idx != slice(None):
            return Judgement(Verdict.NOT, f"indexes spatial dim {dim} with {idx!r}: samples the map")
    if Ellipsis in index:
        tail = index[index.index(Ellipsis) + 1:]
        for offset, idx in enumerate(reversed(tail), start=1):
            if x.roles[-offset] and idx != slice(None):
                return Judgement(Verdict.NOT, f"indexes spatial dim {len(x.roles) - offset} with {idx!r}: samples the map")
    return Judgement(Verdict.EXACT, "selects channels or items, H and W kept whole")


def _judge_spatial_norm(site: Site, options) -> Judgement:
    if site.output is not None and not site.output.is_spatial:
        return Judgement(Verdict.EXACT, "L2 norm over H, W: invariant (Parseval)")
    return Judgement(Verdict.NOT, "a norm over some but not all of H, W, or per pixel: a nonlinearity")


def _judge_mean(site: Site, options) -> Judgement:
    if site.output is not None and not site.output.is_spatial:
        return Judgement(Verdict.EXACT, "global average over H, W: keeps only the DC bin, invariant")
    return Judgement(Verdict.EXACT, "mean over non-spatial dims or along H or W alone: linear, commutes with shifts")


def _judge_pool_wrapper(site: Site, options) -> Judgement:
    """timm's SelectAdaptivePool2d, by its pool type and what it leaves (its output size, its flatten)."""
    pool, out = site.module, site.output
    if not site.spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    if not pool.pool_type:  # no pooling: the map itself, flattened or not
        return _judge_shape(site, options)
    size = getattr(pool.pool, "output_size", 1)
    if (out is not None and out.is_spatial) or size not in (1, (1, 1), [1, 1]):
        return Judgement(Verdict.NOT, f"'{pool.pool_type}' pooling to a {size} grid: the grid moves with the input by a "
                                      f"fractional stride, not alias-free")
    if pool.pool_type in ("avg", "fast", "fastavg"):
        return Judgement(Verdict.EXACT, "global average pooling: invariant")
    if "max" in pool.pool_type:
        return Judgement(Verdict.INTEGER, f"global '{pool.pool_type}' pooling: invariant to integer shifts only")
    return Judgement(Verdict.UNKNOWN, f"global '{pool.pool_type}' pooling: no rule knows this pool type")


def _judge_linear_layer(site: Site, options) -> Judgement:
    if isinstance(site.module, UpsampledLinear):
        return Judgement(Verdict.EXACT, f"ideal {site.module.factor}x up-sampling, then pointwise linear")
    if isinstance(site.module, DownsampledLinear):
        return Judgement(Verdict.EXACT, f"pointwise linear, then ideal {site.module.factor}x down-sampling")
    x = site.x
    if x is None or not x.is_spatial:
        return Judgement(Verdict.EXACT, "spatially constant input")
    if x.mixed:
        return Judgement(Verdict.NOT, "fully connected over a flattened map: weighs each position differently")
    if x.roles[-1]:
        return Judgement(Verdict.NOT, "linear layer acting along a spatial dim")
    return Judgement(Verdict.EXACT, "pointwise linear map over channels")


def _judge_metadata(site: Site, options) -> Judgement:
    return Judgement(Verdict.EXACT, "reads shapes only")


RULES = [
    Rule(name="linear-op", family=FAMILY, targets=EXACT_LINEAR, judge=_judge_linear_op),
    Rule(name="indexing", family=FAMILY, targets=INDEXING, judge=_judge_indexing),
    Rule(name="spatial-norm", family=FAMILY, targets=SPATIAL_NORMS, judge=_judge_spatial_norm),
    Rule(name="shape", family=FAMILY, targets=SHAPE_OPS, judge=_judge_shape),
    Rule(name="product", family=FAMILY, targets=PRODUCTS, judge=_judge_product),
    Rule(name="quotient", family=FAMILY, targets=QUOTIENTS, judge=_judge_quotient),
    Rule(name="global-mean", family=FAMILY, targets=SPATIAL_MEANS, judge=_judge_mean),
    Rule(name="global-pool", family=FAMILY, targets=(SelectAdaptivePool2d,), judge=_judge_pool_wrapper),
    Rule(name="linear-layer", family=FAMILY, targets=(nn.Linear, UpsampledLinear, DownsampledLinear),
         judge=_judge_linear_layer),
    Rule(name="metadata", family=FAMILY, targets=METADATA, judge=_judge_metadata),
]
