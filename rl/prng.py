"""How JAX's threefry random-number hash is compiled for the CPU.

JAX lowers its threefry-2x32 hash (every ``jax.random`` draw, split and fold-in with the default
key type) to XLA as a rolled loop of its five four-round blocks on the CPU, and unrolled on other
platforms. Inside a jitted SAC update that makes several small XLA ``while`` loops per update,
each with its own loop overhead and none fused with the ops around it. The unrolled form has
neither: ``experiments/results/README.md`` measures o2o's scanned SAC update 1-5 % faster with
it and PPO and LOOP on a JAX-native environment, whose rollouts sample inside scanned steps,
1.1-1.4x faster, with no slower compilation. Both forms compute the same bits, so random streams
(and every result that depends only on them) are unchanged; what can change is XLA's fusion of
the ops that consume the bits, hence float rounding in the last place.

Importing ``rl`` switches the CPU lowering to JAX's own unrolled rule (``use_unrolled_threefry``);
call it with ``False``, or use ``threefry_lowering(unrolled=False)`` around the first call of a
jitted function, to get JAX's default back. Only functions compiled afterwards are affected.

Why this reaches into JAX's private ``jax._src.random.threefry2x32``: JAX exposes the primitive
(``jax.extend.random.threefry2x32_p``) and lowering registration (``jax.interpreters.mlir``) but
not its two lowering rules, and re-implementing the hash would duplicate code that must match
JAX's bit for bit. If a JAX version no longer has the rules under these names, nothing is
changed and ``use_unrolled_threefry`` returns ``False``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from jax.interpreters import mlir

_state = {"unrolled": False}


@functools.cache
def _jax_rules() -> tuple[Any, Callable, Callable] | None:
    """JAX's threefry primitive and its (rolled CPU, unrolled) lowering rules, or ``None`` if this
    JAX version does not have them under the expected names."""
    try:
        from jax._src.random import threefry2x32 as module
        from jax.extend.random import threefry2x32_p
    except ImportError:
        return None
    rolled = getattr(module, "_threefry2x32_cpu_lowering_rule", None)
    unrolled = getattr(module, "_threefry2x32_lowering_rule", None)
    return (threefry2x32_p, rolled, unrolled) if callable(rolled) and callable(unrolled) else None


def use_unrolled_threefry(unrolled: bool = True) -> bool:
    """Lower threefry unrolled (``True``) or as JAX's default rolled loop (``False``) in CPU
    programs compiled from now on. Returns whether the requested lowering is in place."""
    rules = _jax_rules()
    if rules is None:
        return not unrolled
    primitive, rolled, unrolled_rule = rules
    mlir.register_lowering(primitive, unrolled_rule if unrolled else rolled, platform="cpu")
    _state["unrolled"] = unrolled
    return True


def unrolled_threefry() -> bool:
    """Whether CPU programs compiled now get the unrolled threefry lowering."""
    return _state["unrolled"]


@contextlib.contextmanager
def threefry_lowering(unrolled: bool) -> Iterator[None]:
    """Compile with the given threefry lowering inside the block, then restore the previous one
    (e.g. ``unrolled=False`` to measure another JAX library with JAX's defaults)."""
    previous = unrolled_threefry()
    use_unrolled_threefry(unrolled)
    try:
        yield
    finally:
        use_unrolled_threefry(previous)
