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
:data:`SMALL_PRODUCT_MACS`. Only the compiler changes: the program computes the same function.
A user's own ``XLA_FLAGS`` setting of the option wins; on other backends, or if a future XLA
drops the option, nothing is set.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
"""XLA's option listing the op kinds the CPU backend fuses into YNNPACK calls (empty: none)."""

SMALL_PRODUCT_MACS = 12_000_000
"""Below this typical product size (multiply-adds of one matrix product) YNNPACK fusion is off."""


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


def compiler_options(fn: Callable, *args: Any) -> dict[str, str]:
    """The XLA options :func:`jit` compiles ``fn(*args)`` with (see the module docstring)."""
    if jax.default_backend() != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    sizes = product_sizes(jax.make_jaxpr(fn)(*args).jaxpr)
    if not sizes or typical_product_macs(sizes) >= SMALL_PRODUCT_MACS or not _ynn_option_supported():
        return {}
    return {YNN_FUSION_OPTION: ""}


class jit:  # noqa: N801 - used like jax.jit
    """``jax.jit(fn, **jit_kwargs)`` whose XLA options are chosen from the program traced at the
    first call (or ``lower``); later calls reuse them. Supports calling and ``lower``."""

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self._fn, self._jit_kwargs = fn, jit_kwargs
        self._jitted: Callable | None = None
        functools.update_wrapper(self, fn)

    def _jitted_for(self, args: tuple) -> Any:
        if self._jitted is None:
            options = compiler_options(self._fn, *args)
            self._jitted = jax.jit(self._fn, compiler_options=options or None, **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args: Any) -> Any:
        return self._jitted_for(args)(*args)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """``jax.jit(...).lower`` with the chosen options."""
        return self._jitted_for(args).lower(*args)
