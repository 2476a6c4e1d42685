"""The CPU threefry lowering o2o selects: unrolled once ``rl`` is imported, switchable back to
JAX's rolled loop, and the same random bits either way."""

import contextlib

import jax
import numpy as np

import rl  # noqa: F401  (importing rl selects the unrolled lowering)
from rl.prng import threefry_lowering, unrolled_threefry, use_unrolled_threefry


def random_draws(key: jax.Array) -> dict[str, jax.Array]:
    """A sample of every kind of draw o2o's agents make."""
    return {
        "normal": jax.random.normal(key, (1000, 6)),
        "indices": jax.random.randint(jax.random.fold_in(key, 1), (256,), 0, 100_000),
        "keys": jax.random.split(key, 7),
        "uniform": jax.random.uniform(jax.random.split(key)[1], (33,)),
        "bits": jax.random.bits(key, (5,)),
    }


def compiled_text(unrolled: bool | None = None) -> str:
    """The optimised HLO of ``random_draws`` compiled afresh (a new function: JAX caches a
    function's compiled program whatever lowering is selected later), under the given lowering or,
    with ``None``, the one in place."""
    with threefry_lowering(unrolled) if unrolled is not None else contextlib.nullcontext():
        return jax.jit(lambda key: random_draws(key)).lower(jax.random.PRNGKey(0)).compile().as_text()


def test_importing_rl_compiles_threefry_without_while_loops_on_cpu():
    assert unrolled_threefry()
    assert " while(" not in compiled_text()
    assert " while(" in compiled_text(unrolled=False)


def test_lowering_switch_is_restored_after_the_block():
    with threefry_lowering(unrolled=False):
        assert not unrolled_threefry()
    assert unrolled_threefry()
    assert use_unrolled_threefry(False) and not unrolled_threefry()
    assert use_unrolled_threefry(True) and unrolled_threefry()


def test_both_lowerings_draw_the_same_bits():
    draws = {}
    for unrolled in (False, True):
        with threefry_lowering(unrolled=unrolled):
            draws[unrolled] = jax.jit(lambda key: random_draws(key))(jax.random.PRNGKey(123))
    for name in draws[True]:
        np.testing.assert_array_equal(np.asarray(draws[False][name]), np.asarray(draws[True][name]), err_msg=name)
