"""XLA options chosen per training program on the CPU backend.

XLA's CPU backend hands matrix products (and fused element-wise work around them) to YNNPACK by
default. For large products that is the faster path, for small ones much the slower: the same
scanned SAC update, one seed, YNNPACK fusion on against off (2-core CPU, 2026-11-29, paired
windows), by the size of one matrix product of the update (multiply-adds of a
``batch x width`` by ``width x width`` product):

==========================================  =================  =============
networks, batch                              product size       off / on
==========================================  =================  =============
64 x 64, batch 256                           1.0 M              1.08x
128 x 128, batch 256                         4.2 M              1.39x
WSRL at ``wsrl_locomotion``'s CPU scale       4.2 M              1.38x
192 x 192, batch 256                         9.4 M              1.12x
128 x 128, batch 1024                        16.8 M             1.02x
256 x 256, batch 256 (``bench_updates``)     16.8 M             0.96x
256 x 256, 5 critics                         16.8 M             0.94x
512 x 512, batch 256                         67.1 M             0.90x
==========================================  =================  =============

(Cal-QL pre-training at that CPU scale, whose critics see the batch and its sampled actions,
ran 0.83x with it off.) :func:`jit` therefore traces the program once, takes the FLOP-weighted
median size of its matrix products, and compiles with YNNPACK fusion off when that is below
:data:`SMALL_PRODUCT_MACS`, or below :data:`SMALL_PRODUCT_MACS_WITH_LAYER_NORM` when the program
has o2o's LayerNorm (:func:`rl.nets.layer_norm`).

LayerNorm is the other half of the choice. With YNNPACK fusion on, YNNPACK also runs the
reductions over a layer's features; with it off, XLA splits every reduction longer than 32 into
32-wide windows (``reduce-window``), which its CPU code runs slowly: 22 % of the op time of
WSRL's update at the CPU scale. A program compiled with the fusion off is therefore traced with
:func:`chunked_row_sums` true, and o2o's LayerNorm then adds aligned 32-wide slices of a row before
one 32-wide reduction, in its forward and its hand-written backward pass. Measured, one seed,
paired windows, updates/s against the same update with flax's LayerNorm before this rule (2-core
CPU, 2026-11-29): WSRL online at the ``wsrl_locomotion`` CPU scale 165.7 against 129.0 (both with
the fusion off: 1.28x), at the paper's scale (10 critics, 256 x 256, typical product 16.8 M)
27.0 against 19.8 with the fusion on (1.37x); the quickstart's Cal-QL and WSRL updates (64 x 64,
10 critics) 1.18x and 1.37x. Near the bound the settings tie (Cal-QL at the CPU scale, 31.5 M:
232.6 chunked with the fusion off against 232.2 on); above it the fusion wins (Cal-QL at the
paper's scale, 503 M: 15.9 on against 15.1 off), and there LayerNorm keeps XLA's reductions,
which YNNPACK runs (the chunked form with the fusion on: 13.6).

Only the compiler and the summation order change: the program computes the same function. A
user's own ``XLA_FLAGS`` setting of the option wins (an empty one counts as fusion off); on other
backends, or if a future XLA drops the option, nothing is set.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
"""XLA's option listing the op kinds the CPU backend fuses into YNNPACK calls (empty: none)."""

SMALL_PRODUCT_MACS = 12_000_000
"""Below this typical product size (multiply-adds of one matrix product) YNNPACK fusion is off."""

SMALL_PRODUCT_MACS_WITH_LAYER_NORM = 24_000_000
"""The same bound for programs with o2o's LayerNorm, whose reductions run faster in 32-wide
chunks with the fusion off (the crossover lies near Cal-QL's 31.5 M at the CPU scale, where both
settings ran alike)."""

LAYER_NORM_SCOPE = "o2o_layer_norm"
"""The name scope of :func:`rl.nets.layer_norm`, by which a traced program shows it has one."""

_CHUNKED_ROW_SUMS = contextvars.ContextVar("o2o_chunked_row_sums", default=False)


def chunked_row_sums() -> bool:
    """Whether the program being traced sums rows in 32-wide chunks: true while :func:`jit`
    traces a program it compiles with YNNPACK fusion off, false everywhere else."""
    return _CHUNKED_ROW_SUMS.get()


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    """The jaxprs nested in an equation's parameters (open or closed; told apart by their
    attributes, which every JAX version since 0.4 has, rather than by class paths that moved)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def product_sizes(jaxpr: Any) -> list[tuple[int, int]]:
    """``(multiply-adds of one matrix product, number of such matrices)`` for every
    ``dot_general`` in ``jaxpr`` and the programs nested in it (scan and loop bodies, calls);
    batch dimensions count as separate matrices, and a scan body's products once per trip (a
    while loop's once: its trip count is not static)."""
    sizes = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = equation.params["dimension_numbers"]
            lhs, rhs = (var.aval.shape for var in equation.invars)
            matrices = math.prod(lhs[axis] for axis in lhs_batch)
            rhs_free = math.prod(size for axis, size in enumerate(rhs) if axis not in (*rhs_contracting, *rhs_batch))
            sizes.append((math.prod(lhs) // max(matrices, 1) * rhs_free, matrices))
        trips = int(equation.params.get("length", 1)) if equation.primitive.name == "scan" else 1
        for sub in _sub_jaxprs(equation.params):
            sizes += [(size, count * trips) for size, count in product_sizes(sub)]
    return sizes


def typical_product_macs(sizes: list[tuple[int, int]]) -> float:
    """The FLOP-weighted median of the product sizes (0 when there is no product)."""
    if not sizes:
        return 0.0
    macs = np.array([size for size, _ in sizes], dtype=np.float64)
    weights = macs * np.array([count for _, count in sizes], dtype=np.float64)
    order = np.argsort(macs)
    cumulative = np.cumsum(weights[order])
    return float(macs[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


@functools.cache
def _ynn_option_supported() -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options={YNN_FUSION_OPTION: ""}).lower(np.float32(1)).compile()
    except Exception:  # an XLA without the option rejects it at compile time
        return False
    return True


def has_layer_norm(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a program nested in it) calls :func:`rl.nets.layer_norm`."""
    return any(
        LAYER_NORM_SCOPE in str(equation.source_info.name_stack)
        or any(has_layer_norm(sub) for sub in _sub_jaxprs(equation.params))
        for equation in jaxpr.eqns
    )


def _users_ynn_setting() -> str | None:
    """The value the user's own ``XLA_FLAGS`` give the option (unquoted), or None if unset."""
    match = re.search(rf"--{YNN_FUSION_OPTION}(?:=(\S*))?", os.environ.get("XLA_FLAGS", ""))
    return None if match is None else (match.group(1) or "").strip("'\"")


def compiler_options(fn: Callable, *args: Any) -> dict[str, str]:
    """The XLA options :func:`jit` compiles ``fn(*args)`` with (see the module docstring)."""
    if jax.default_backend() != "cpu" or _users_ynn_setting() is not None:
        return {}
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    sizes = product_sizes(jaxpr)
    if not sizes or not _ynn_option_supported():
        return {}
    bound = SMALL_PRODUCT_MACS_WITH_LAYER_NORM if has_layer_norm(jaxpr) else SMALL_PRODUCT_MACS
    return {YNN_FUSION_OPTION: ""} if typical_product_macs(sizes) < bound else {}


def _ynn_fusion_off(options: dict[str, str]) -> bool:
    """Whether a CPU program compiled with ``options`` (and the user's XLA_FLAGS) fuses nothing
    into YNNPACK."""
    if jax.default_backend() != "cpu":
        return False
    users = _users_ynn_setting()
    return users == "" if users is not None else options.get(YNN_FUSION_OPTION) == ""


def _traced_with_chunked_row_sums(fn: Callable) -> Callable:
    """``fn`` whose tracing sees :func:`chunked_row_sums` true."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        token = _CHUNKED_ROW_SUMS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _CHUNKED_ROW_SUMS.reset(token)

    return traced


class jit:  # noqa: N801 - used like jax.jit
    """``jax.jit(fn, **jit_kwargs)`` whose XLA options are chosen from the program traced at the
    first call (or ``lower``); later calls reuse them. A program compiled with YNNPACK fusion off
    is traced with :func:`chunked_row_sums` true. Supports calling and ``lower``."""

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self._fn, self._jit_kwargs = fn, jit_kwargs
        self._jitted: Callable | None = None
        functools.update_wrapper(self, fn)

    def _jitted_for(self, args: tuple) -> Any:
        if self._jitted is None:
            options = compiler_options(self._fn, *args)
            fn = _traced_with_chunked_row_sums(self._fn) if _ynn_fusion_off(options) else self._fn
            self._jitted = jax.jit(fn, compiler_options=options or None, **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args: Any) -> Any:
        return self._jitted_for(args)(*args)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """``jax.jit(...).lower`` with the chosen options."""
        return self._jitted_for(args).lower(*args)
