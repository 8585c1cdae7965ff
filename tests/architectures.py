"""Random convnet architectures for looking for false certificates (tests/converter/test_certificate_fuzz.py,
and ``python tests/architectures.py --count 1000`` for a long run).

``random_model(seed)`` draws a stem, a body of blocks and a head from every family of ops the converter has
rules for, each with the arguments that decide whether it is alias-free: convolutions (stride, dilation,
groups, padding amount and mode), pooling modules and their functional forms (stride, padding, dilation,
ceil_mode, count_include_pad, divisor_override), activations, norms, residuals, concatenations (along channels
and along a spatial dim), gates, up-sampling, and heads: adaptive average and max pools to 1 x 1, 2 x 2,
3 x 3 and non-square grids, timm's SelectAdaptivePool2d, global means and maxima, each flattened by
``torch.flatten``, ``nn.Flatten``, ``.view`` or ``.reshape`` into a Linear. A drawn block that does not run at
both sizes is drawn again. ``check(seed)`` converts the model and, when the converter certifies it, measures
it in float64 at two sizes under integer and fractional shifts.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = [(32, 32), (24, 40), (33, 27), (36, 30), (28, 28)]
SHIFTS = [(1, 0), (0, 1), (3, -2), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, -0.75)]
TOLERANCE = 1e-8       # of the logits' spread, in float64


class Functional(nn.Module):
    """A functional call with constant arguments (traced as a call_function node)."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{self.fn.__name__}, {self.args}, {self.kwargs}"


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, body: nn.Module, dim: int):
        super().__init__()
        self.body, self.dim = body, dim

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=self.dim)


class Gate(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(conv(mean over H, W))."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class PositionalEmbedding(nn.Module):
    """Adds a fixed pattern resized to the map (a positional embedding: it does not move with the input)."""

    def __init__(self, c: int, h: int, w: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, c, h, w))

    def forward(self, x):
        return x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear")


class Flatten(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "view":
            return x.view(x.size(0), -1)
        if self.how == "reshape":
            return x.reshape(x.shape[0], -1)
        return torch.flatten(x, 1)


class Net(nn.Module):
    def __init__(self, body: list[nn.Module], head: nn.Module):
        super().__init__()
        self.body, self.head = nn.Sequential(*body), head

    def forward(self, x):
        return self.head(self.body(x))


def _conv(rng: random.Random, c: int, c2: int, spatial=True) -> nn.Conv2d:
    k = rng.choice([1, 2, 3, 3, 4, 5]) if spatial else 1
    stride = rng.choice([1, 1, 1, 2, 2, 3])
    dilation = rng.choice([1, 1, 2]) if k > 1 else 1
    groups = rng.choice([g for g in (1, 2, c) if c % g == 0 and c2 % g == 0])
    mode = rng.choice(["zeros", "circular", "circular", "reflect"])
    reach = dilation * (k - 1)
    pad = rng.choice([0, reach // 2, reach // 2, (reach + 1) // 2, "same"] if stride == 1 else [0, reach // 2])
    if mode != "zeros" and pad == 0:
        mode = "zeros"
    return nn.Conv2d(c, c2, k, stride, pad, dilation, groups, padding_mode=mode)


def _pool(rng: random.Random) -> nn.Module:
    k = rng.choice([1, 2, 3])
    stride = rng.choice([None, 1, 2])
    pad = rng.choice([0, k // 2])
    ceil = rng.random() < 0.3
    if rng.random() < 0.5:
        dilation = rng.choice([1, 2]) if pad == 0 else 1
        if rng.random() < 0.5:
            return nn.MaxPool2d(k, stride, pad, dilation, ceil_mode=ceil)
        return Functional(F.max_pool2d, k, stride, pad, dilation, ceil)
    kwargs = dict(ceil_mode=ceil, count_include_pad=rng.random() < 0.5,
                  divisor_override=rng.choice([None, None, 2]))
    if rng.random() < 0.5:
        return nn.AvgPool2d(k, stride, pad, **kwargs)
    return Functional(F.avg_pool2d, k, stride, pad, **kwargs)


def _activation(rng: random.Random) -> nn.Module:
    return rng.choice([nn.ReLU(), nn.GELU(), nn.SiLU(), Functional(F.relu), nn.Hardswish()])


def _norm(rng: random.Random, c: int) -> nn.Module:
    from timm.layers import LayerNorm2d
    return rng.choice([nn.BatchNorm2d(c), nn.GroupNorm(1 if c % 2 else 2, c), LayerNorm2d(c)])


def _block(rng: random.Random, c: int, size: tuple[int, int]) -> tuple[nn.Module, int]:
    """One body block on a (c, *size) map and its output channels."""
    kind = rng.choice(["conv", "conv", "pool", "act", "norm", "residual", "concat", "gate", "upsample", "posemb",
                       "convact"])
    if kind == "conv":
        c2 = rng.choice([c, 2 * c])
        return _conv(rng, c, c2), c2
    if kind == "convact":
        c2 = rng.choice([c, 2 * c])
        return nn.Sequential(_conv(rng, c, c2), _norm(rng, c2), _activation(rng)), c2
    if kind == "pool":
        return _pool(rng), c
    if kind == "act":
        return _activation(rng), c
    if kind == "norm":
        return _norm(rng, c), c
    if kind == "residual":
        mode = rng.choice(["zeros", "circular"])
        return Residual(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, padding_mode=mode), _activation(rng))), c
    if kind == "concat":
        dim = rng.choice([1, 1, 3])
        return Concat(nn.Conv2d(c, c, 1), dim), (2 * c if dim == 1 else c)
    if kind == "gate":
        return Gate(c), c
    if kind == "posemb":
        return PositionalEmbedding(c, *size), c
    mode = rng.choice(["nearest", "bilinear"])
    if rng.random() < 0.5:
        return nn.Upsample(scale_factor=2, mode=mode), c
    return Functional(F.interpolate, scale_factor=2, mode=mode), c


def _head(rng: random.Random, c: int, classes: int = 5) -> nn.Module:
    from timm.layers import SelectAdaptivePool2d
    kind = rng.choice(["adaptive_avg", "adaptive_avg", "adaptive_max", "functional_avg", "mean", "amax", "select"])
    if kind == "mean":
        return nn.Sequential(Functional(torch.mean, (2, 3)), nn.Linear(c, classes))
    if kind == "amax":
        return nn.Sequential(Functional(torch.amax, (2, 3)), nn.Linear(c, classes))
    if kind == "select":
        pool_type = rng.choice(["avg", "max", "avgmax", "fast"])
        return nn.Sequential(SelectAdaptivePool2d(pool_type=pool_type, flatten=True), nn.Linear(c, classes))
    size = rng.choice([1, 1, 2, 3, (2, 3), (1, 2)])
    cells = size * size if isinstance(size, int) else size[0] * size[1]
    pool = {"adaptive_avg": nn.AdaptiveAvgPool2d(size), "adaptive_max": nn.AdaptiveMaxPool2d(size),
            "functional_avg": Functional(F.adaptive_avg_pool2d, size)}[kind]
    flatten = rng.choice([nn.Flatten(), Flatten("flatten"), Flatten("view"), Flatten("reshape")])
    return nn.Sequential(pool, flatten, nn.Linear(c * cells, classes))


def _runs(model: nn.Module, sizes) -> list[tuple[int, ...]] | None:
    try:
        with torch.no_grad():
            return [tuple(model(torch.zeros(1, 3, *s)).shape) for s in sizes]
    except RuntimeError:
        return None


@dataclass
class Drawn:
    model: nn.Module
    sizes: list[tuple[int, int]]       # the probe size, then another size it runs at
    options: dict


def random_model(seed: int) -> Drawn:
    """A random architecture that runs at its two sizes, with random (BatchNorm-calibrated) weights."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    first = rng.choice(SIZES)
    sizes = [first, rng.choice([s for s in SIZES if s != first])]
    c = rng.choice([4, 6, 8])
    body: list[nn.Module] = [nn.Conv2d(3, c, 3, 1, 1, padding_mode=rng.choice(["zeros", "circular"]))]
    for _ in range(rng.randint(1, 5)):
        for _try in range(10):
            shape = _runs(nn.Sequential(*body), sizes[:1])[0]
            block, c2 = _block(rng, c, shape[-2:])
            trial = nn.Sequential(*body, block)
            shapes = _runs(trial, sizes)
            if shapes is not None and all(s[-1] >= 2 and s[-2] >= 2 for s in shapes):
                body.append(block)
                c = c2
                break
    for _try in range(10):
        head = _head(rng, c)
        model = Net(body, head).eval()
        if _runs(model, sizes) is not None:
            break
    else:  # a head that runs at every size
        model = Net(body, nn.Sequential(Functional(torch.mean, (2, 3)), nn.Linear(c, 5))).eval()
    _calibrate(model, sizes[0])
    options = {"pool": {"head": "global"}} if rng.random() < 0.3 else {}
    return Drawn(model, sizes, options)


def _calibrate(model: nn.Module, size) -> None:
    """BatchNorm statistics of random inputs, so the random network's logits depend on its input."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *size))
    model.eval()


@dataclass
class Outcome:
    seed: int
    status: str         # "certified", "not certified", "vetoed" (judged exact, measured moving), "refused", "crash",
                        # "FALSE CERTIFICATE"
    detail: str = ""


def invariance_error(model: nn.Module, size, shifts=SHIFTS, batch: int = 4, seed: int = 0) -> float:
    """max over shifts of max |f(shift(x)) - f(x)| / (the logits' spread over the batch), in float64."""
    from afconvert.converter.certify import random_input, relative_change
    from afconvert.layers.spectral import fractional_shift
    model = model.double().eval()
    x = random_input(batch, 3, size, torch.float64, seed)
    with torch.no_grad():
        y = model(x)
        scale = "spread" if float(y.std(0).mean()) > 1e-6 * float(y.abs().max()) else "max"
        return max(relative_change(model(fractional_shift(x, *s)), y, scale) for s in shifts)


def check(seed: int) -> Outcome:
    """Convert random model ``seed``; a certified one must be invariant at both of its sizes."""
    import afconvert
    drawn = random_model(seed)
    try:
        converted = afconvert.convert(drawn.model, input_size=drawn.sizes[0], options=drawn.options)
    except Exception as exc:  # a refusal: one line, from afconvert, naming the problem
        text = str(exc)
        clean = type(exc).__module__.startswith("afconvert") and "\n" not in text.strip() and text
        return Outcome(seed, "refused" if clean else "crash", f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")
    report = converted.afconvert_report
    if report.contradicted:  # the analysis was wrong and the measurement caught it: a rule to fix
        return Outcome(seed, "vetoed", report.disagreement)
    if not report.certified:
        return Outcome(seed, "not certified", report.verdict.value)
    errors = [invariance_error(converted, s) for s in drawn.sizes]
    if not max(errors) <= TOLERANCE:
        return Outcome(seed, "FALSE CERTIFICATE", f"float64 change {max(errors):.2e} at sizes {drawn.sizes}")
    return Outcome(seed, "certified", f"{max(errors):.1e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Look for false certificates among random architectures.")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--first-seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.count):
        out = check(seed)
        counts[out.status] = counts.get(out.status, 0) + 1
        if out.status in ("FALSE CERTIFICATE", "crash", "vetoed"):
            print(f"seed {seed}: {out.status}: {out.detail}", flush=True)
    print(f"seeds {args.first_seed}..{args.first_seed + args.count - 1}: " +
          ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" ({time.perf_counter() - t0:.0f} s)")
    return 1 if counts.get("FALSE CERTIFICATE") or counts.get("crash") or counts.get("vetoed") else 0


if __name__ == "__main__":
    sys.exit(main())
