"""The products of the dense (matrix) form of ideal resampling, and the backends that compute them.

A separable linear map of 2-D maps is a pair of matrices: Y = A_0 X A_1^T over two dims of a tensor
(``Separable``; X (..., N_0, ..., N_1, ...) -> Y (..., n_0, ..., n_1, ...)). ``apply`` computes one,
``through`` the pattern of an alias-free activation, B(f(A_1 x_1, ..., A_k x_k)): inputs taken to a common
grid, combined pointwise, taken to the output. How is this module's business alone:

* **backends**: float32 products on a CPU run as 1 x 1 convolutions (oneDNN) over the map's rows where the
  ``products`` setting allows (``afconvert.settings``), else as ``torch.matmul`` (and always in float64, on
  CUDA, outside autocast);
* **paths**: small maps as one product with the Kronecker matrix A_0 (x) A_1, large ones as two products along
  the last dim with a transpose between (the grid maps of ``through`` stay transposed: two copies fewer), the
  rest as two products, the dim that shrinks most first; channels-last maps moved to the last two dims for
  ``through`` where that is faster;
* **memory**: large batches of maps are computed in slices (of all maps, the dims before the last two
  flattened, or of the outermost dim) so that no intermediate is larger than ``SLICE_BYTES``: freed slices are
  reused by the C library's allocator at once, where one large map would be mapped fresh from the system and
  zero-filled on every call (no process-wide allocator setting needed), and a slice's products stay in cache;
* **the matrix cache**: built matrices by key, least recently used evicted past ``CACHE_SIZE``.

Every path computes the same operator; the tests compare each with the float64 definition.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from afconvert import settings

__all__ = ["Separable", "cached", "dense_preferred", "backend", "apply", "through", "along"]

DENSE_MAX_SIZE = 512        # "auto" resampling: maps up to this size (each dim, in and out) take the dense form
KRON_MAX_SAMPLES = 128      # maps with at most this many samples (in and out) take one Kronecker product
SWAP_MIN_SIZE = 28          # maps of at least this size (each dim, in and out) take the two last-dim products
MOVE_MIN_SIZE = 56          # channels-last maps of at least this size move to the last two dims for ``through``
SLICE_BYTES = 2 << 20       # the largest intermediate maps computed at once
CACHE_SIZE = 512            # matrices kept
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()      # a property of this PyTorch build


class Separable(NamedTuple):
    """Y = A_0 X A_1^T: ``a0`` (n_0, N_0) and ``a1`` (n_1, N_1) in one dtype and device; ``key`` names the pair
    (for the cached Kronecker matrix)."""
    a0: torch.Tensor
    a1: torch.Tensor
    key: tuple

    @property
    def T(self) -> "Separable":
        """The adjoint Y = A_0^T X A_1."""
        return Separable(self.a0.T, self.a1.T, ("adjoint", *self.key))

    @property
    def size_in(self) -> tuple[int, int]:
        return self.a0.shape[1], self.a1.shape[1]

    @property
    def size_out(self) -> tuple[int, int]:
        return self.a0.shape[0], self.a1.shape[0]


# A plain dict in use order (a hit moves its key to the end, outside graph capture): torch.compile reads an
# entry as a constant tensor, where functools.lru_cache would be traced into the FFTs that build the matrix.
_CACHE: dict = {}


def cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The matrix under ``key``, built by ``build()`` on a miss; the least recently used beyond ``CACHE_SIZE``
    are dropped."""
    mat = _CACHE.get(key)
    if mat is None:
        mat = _CACHE[key] = _untraced(build)
        while len(_CACHE) > CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
    elif not torch.compiler.is_compiling():
        _CACHE[key] = _CACHE.pop(key)
    return mat


def _untraced(build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """build() unseen by ``torch.jit.trace``: a traced graph holds the matrix as a constant, the same whether the
    cache had it or not (as ``torch.nn.Module`` does for its hooks, through the tracer's own state)."""
    state = torch._C._get_tracing_state()
    if state is None:
        return build()
    torch._C._set_tracing_state(None)
    try:
        return build()
    finally:
        torch._C._set_tracing_state(state)


def dense_preferred(dtype: torch.dtype, device: torch.device, sizes: Sequence[int]) -> bool:
    """The ``auto`` resampling choice for maps computed in ``dtype`` on ``device``: the dense form for float32 /
    float64 maps up to ``DENSE_MAX_SIZE`` (sizes in and out), the FFT form for larger ones, and on CUDA for
    float32 when its products may use TF32."""
    if dtype not in (torch.float32, torch.float64) or max(sizes) > DENSE_MAX_SIZE:
        return False
    return dtype is torch.float64 or device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"


def backend(device: str | torch.device = "cpu") -> str:
    """What float32 products run as on ``device``: "oneDNN" (1 x 1 convolutions: a CPU, the ``products`` setting
    not "matmul", PyTorch built with oneDNN) or "matmul"."""
    onednn = settings.products() != "matmul" and _ONEDNN_BUILT and torch.device(device).type == "cpu"
    return "oneDNN" if onednn else "matmul"


def _onednn(x: torch.Tensor) -> bool:
    """Whether x's products run as 1 x 1 convolutions (CPU, float32, the ``products`` setting)."""
    return x.dtype == torch.float32 and x.numel() > 0 and backend(x.device) == "oneDNN"


def _conv_product(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)         # (1, n_in, P, 1), channels-last
    y = F.conv2d(rows, a.contiguous().reshape(*a.shape, 1, 1))
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], a.shape[0])


class _ConvProduct(torch.autograd.Function):
    """X A^T as ``_conv_product``, its gradient G A as another (a convolution's own backward is slower here)."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(a)
        return _conv_product(x, a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return _conv_product(g, a.T), None


def _last(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """X A^T along the last dim: (..., N) -> (..., n)."""
    if not _onednn(x):
        return torch.matmul(x, a.T)
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return _ConvProduct.apply(x, a)
    return _conv_product(x, a)


def along(x: torch.Tensor, a: torch.Tensor, d: int) -> torch.Tensor:
    """A (n, N) applied along dim d of x: (..., N, ...) -> (..., n, ...), one ``torch.matmul`` over a view of x
    as (P, N, Q) (no copy of a contiguous x)."""
    d = d % x.ndim
    shape = x.shape
    p, q = math.prod(shape[:d]), math.prod(shape[d + 1:])
    if q == 1:
        y = torch.matmul(x.reshape(p, shape[d]), a.T)
    else:
        y = torch.matmul(a, x.reshape(p, shape[d], q))
    return y.view(*shape[:d], a.shape[0], *shape[d + 1:])


def _swap(x: torch.Tensor) -> torch.Tensor:
    """The last two dims swapped, stored so (a copy)."""
    return x.transpose(-1, -2).contiguous()


def _kron(op: Separable) -> bool:
    return max(math.prod(op.size_in), math.prod(op.size_out)) <= KRON_MAX_SAMPLES


def _swaps(x: torch.Tensor, op: Separable) -> bool:
    """Whether ``op`` on x's last two dims runs as two last-dim products (the result stored transposed)."""
    return _onednn(x) and not _kron(op) and min(*op.size_in, *op.size_out) >= SWAP_MIN_SIZE


def _swapped(x: torch.Tensor, op: Separable, transposed_in: bool) -> torch.Tensor:
    """``op`` on maps X on the last two dims (stored (.., N_1, N_0) when ``transposed_in``) as two last-dim
    products with one transpose between: the result stored transposed to the input, (..., n_1, n_0) from a plain
    X, (..., n_0, n_1) from a transposed one."""
    first, second = (op.a0, op.a1) if transposed_in else (op.a1, op.a0)
    return _last(_swap(_last(x, first)), second)


def _plain(x: torch.Tensor, op: Separable, d0: int, d1: int) -> torch.Tensor:
    """``op`` over dims (d0, d1) of x, in x's layout."""
    last_two = (d0, d1) == (x.ndim - 2, x.ndim - 1)
    if last_two and _kron(op):
        a0, a1 = op.a0, op.a1
        kron = cached(("kron", *op.key), lambda: (a0[:, None, :, None] * a1[None, :, None, :]).reshape(
            a0.shape[0] * a1.shape[0], a0.shape[1] * a1.shape[1]))
        return _last(x.reshape(-1, kron.shape[1]), kron).reshape(*x.shape[:-2], *op.size_out)
    if last_two and _swaps(x, op):
        return _swap(_swapped(x, op, False))
    (n0, n1), (m0, m1) = op.size_in, op.size_out
    r0, r1 = m0 / n0, m1 / n1
    a1_first = r1 < r0 if r0 != r1 else (d1 > d0 if r0 > 1 else d1 < d0)
    steps = ((op.a1, d1), (op.a0, d0)) if a1_first else ((op.a0, d0), (op.a1, d1))
    for a, d in steps:
        x = _last(x, a) if d == x.ndim - 1 else along(x, a, d)
    return x


def _outside_autocast(fn):
    """fn run in the matrices' dtype: autocast (bf16 / fp16 products) is switched off around it."""
    def run(x: torch.Tensor, *args):
        if torch.is_autocast_enabled(x.device.type):  # entered only when needed (graph capture splits at it)
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, *args)
        return fn(x, *args)
    return run


@_outside_autocast
def _apply(x: torch.Tensor, op: Separable, dims: tuple[int, int]) -> torch.Tensor:
    x = x.to(op.a0.dtype)
    return _sliced([x], lambda v, d: _plain(v[0], op, *d), max(op.size_in, op.size_out, key=math.prod), dims)


def apply(x: torch.Tensor, op: Separable, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """Y = A_0 X A_1^T over ``dims`` of x, computed in the matrices' dtype (autocast off); x's layout kept."""
    return _apply(x, op, tuple(d % x.ndim for d in dims))


def through(inputs: Sequence[tuple[torch.Tensor, Separable]], fn: Callable[..., torch.Tensor], back: Separable,
            dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """B(fn(A_1 x_1, ..., A_k x_k)) over ``dims``: each A_i takes its x_i to one grid, ``fn`` combines the grid
    maps pointwise (it may work in place on its first argument), B takes the result to the output size. Inputs
    share every other dim. The grid maps exist only inside, a slice at a time."""
    dims = tuple(d % inputs[0][0].ndim for d in dims)
    return _through(inputs[0][0], inputs, fn, back, dims)


@_outside_autocast
def _through(x0, inputs, fn, back: Separable, dims: tuple[int, int]) -> torch.Tensor:
    inputs = [(x.to(op.a0.dtype), op) for x, op in inputs]
    ndim = x0.ndim
    if dims != (ndim - 2, ndim - 1) and _moves(x0, inputs, back, dims):
        moved = [(x.movedim(dims, (-2, -1)).contiguous(), op) for x, op in inputs]
        return _through(moved[0][0], moved, fn, back, (ndim - 2, ndim - 1)).movedim((-2, -1), dims).contiguous()
    ops = [op for _, op in inputs]
    return _sliced([x for x, _ in inputs], lambda xs, d: _on_grid(list(zip(xs, ops)), fn, back, d), back.size_in,
                   dims)


def _sliced(xs: Sequence[torch.Tensor], compute, size: Sequence[int], dims: tuple[int, int]) -> torch.Tensor:
    """compute(xs, dims) in slices when the maps of xs[0] at ``size`` exceed ``SLICE_BYTES``: of the maps (all
    dims before the last two flattened, each slice a view) or of the outermost dim. Freed slices are reused by
    the C library's allocator at once (no page faults), and a slice's products stay in cache. Not while a graph
    is captured, where slices would only lengthen it."""
    x = xs[0]
    if _capturing(x):
        return compute(xs, dims)
    per_map = math.prod(size) * x.element_size()
    maps = x.numel() // max(1, x.shape[dims[0]] * x.shape[dims[1]])
    if maps * per_map <= SLICE_BYTES:
        return compute(xs, dims)
    if dims == (x.ndim - 2, x.ndim - 1):
        flat = [v.reshape(-1, *v.shape[-2:]) for v in xs]
        step = max(1, SLICE_BYTES // per_map)
        y = torch.cat([compute(part, (1, 2)) for part in zip(*[v.split(step, 0) for v in flat])], 0)
        return y.view(*x.shape[:-2], *y.shape[-2:])
    step = max(1, SLICE_BYTES * x.shape[0] // (per_map * maps))
    return torch.cat([compute(part, dims) for part in zip(*[v.split(step, 0) for v in xs])], 0)


def _on_grid(inputs, fn, back: Separable, dims: tuple[int, int]) -> torch.Tensor:
    x0 = inputs[0][0]
    last_two = dims == (x0.ndim - 2, x0.ndim - 1)
    if last_two and all(_swaps(x, op) for x, op in inputs) and _swaps(x0, back):
        return _swapped(fn(*[_swapped(x, op, False) for x, op in inputs]), back, True)
    return _plain(fn(*[_plain(x, op, *dims) for x, op in inputs]), back, *dims)


def _moves(x: torch.Tensor, inputs, back: Separable, dims: tuple[int, int]) -> bool:
    """Whether channels-last maps move to the last two dims for ``through`` (two copies of x's size, for the
    faster swapped products on the grid)."""
    return min(x.shape[d] for d in dims) >= MOVE_MIN_SIZE and all(_swaps(x, op) for _, op in (*inputs, (x, back)))


def _capturing(x: torch.Tensor) -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter)
