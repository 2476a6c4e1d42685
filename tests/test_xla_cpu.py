"""Per-program XLA options on the CPU: product sizes read from the traced program, YNNPACK fusion
off for small products only (a larger bound with LayerNorm), such programs traced with chunked row
sums, a user's own XLA_FLAGS setting respected."""

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.sac import SAC, SACConfig
from experiments.bench_updates import random_transitions
from rl import xla_cpu
from rl.data import replay
from rl.nets import LayerNorm
from rl.update import compile_updates


def test_product_sizes_count_batch_matrices_and_scan_trips():
    def fn(x, w, stacked_x, stacked_w):
        def body(carry, _):
            return carry @ w[:, :128], None

        single = x @ w[:, :64]  # 256 x 128 by 128 x 64
        batched = jnp.einsum("cbi,cio->cbo", stacked_x, stacked_w)  # 5 of 256 x 128 by 128 x 128
        looped, _ = jax.lax.scan(body, jnp.ones((256, 128)), None, length=3)
        return single, batched, looped

    args = (jnp.ones((256, 128)), jnp.ones((128, 128)), jnp.ones((5, 256, 128)), jnp.ones((5, 128, 128)))
    sizes = xla_cpu.product_sizes(jax.make_jaxpr(fn)(*args).jaxpr)
    assert sorted(sizes) == sorted([(256 * 128 * 64, 1), (256 * 128 * 128, 5), (256 * 128 * 128, 3)])


def test_typical_product_size_is_the_flop_weighted_median():
    assert xla_cpu.typical_product_macs([]) == 0.0
    # 10 small products (10 M MACs in all) against one large (100 M): the large one holds most FLOPs.
    assert xla_cpu.typical_product_macs([(1_000_000, 10), (100_000_000, 1)]) == 100_000_000
    assert xla_cpu.typical_product_macs([(1_000_000, 300), (100_000_000, 1)]) == 1_000_000


def _update_program_text(hidden: int) -> str:
    spaces = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32), gym.spaces.Box(-1, 1, (6,), np.float32)
    config = SACConfig(actor_hidden_dims=(hidden, hidden), critic_hidden_dims=(hidden, hidden))
    agent = SAC.create(jax.random.PRNGKey(0), *spaces, config)
    return compile_updates(2).lower(agent, replay.from_items(random_transitions(512)), jax.random.PRNGKey(1)).compile().as_text()


def test_small_networks_compile_without_ynnpack_fusion_and_large_ones_with_it(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    if not xla_cpu._ynn_option_supported():
        pytest.skip(f"this XLA has no {xla_cpu.YNN_FUSION_OPTION} option: nothing to choose")
    assert "__ynn_fusion" not in _update_program_text(64)
    assert "__ynn_fusion" in _update_program_text(256)


def test_a_users_own_xla_flags_setting_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.YNN_FUSION_OPTION}=dot")
    small = jnp.ones((64, 64))
    assert xla_cpu.compiler_options(lambda x: x @ x, small) == {}
    monkeypatch.delenv("XLA_FLAGS")
    expected = {xla_cpu.YNN_FUSION_OPTION: ""} if xla_cpu._ynn_option_supported() else {}
    assert xla_cpu.compiler_options(lambda x: x @ x, small) == expected
    assert xla_cpu.compiler_options(lambda x: x + 1, small) == {}  # no product: nothing to choose


def _normalised_product(width: int):
    """A program with one ``256 x width`` by ``width x width`` product followed by o2o's LayerNorm."""
    params = LayerNorm().init(jax.random.PRNGKey(0), jnp.ones((1, width)))
    return lambda x, w: LayerNorm().apply(params, x @ w), (jnp.ones((256, width)), jnp.ones((width, width)))


def test_programs_with_layer_norm_turn_fusion_off_up_to_the_larger_bound(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    if not xla_cpu._ynn_option_supported():
        pytest.skip(f"this XLA has no {xla_cpu.YNN_FUSION_OPTION} option: nothing to choose")
    normalised, args = _normalised_product(256)  # 16.8 M multiply-adds: between the two bounds
    assert xla_cpu.SMALL_PRODUCT_MACS <= 256**3 < xla_cpu.SMALL_PRODUCT_MACS_WITH_LAYER_NORM
    assert xla_cpu.has_layer_norm(jax.make_jaxpr(normalised)(*args).jaxpr)
    assert xla_cpu.compiler_options(normalised, *args) == {xla_cpu.YNN_FUSION_OPTION: ""}
    assert xla_cpu.compiler_options(lambda x, w: jax.nn.relu(x @ w), *args) == {}
    large, large_args = _normalised_product(512)  # 67 M: fusion stays on
    assert xla_cpu.compiler_options(large, *large_args) == {}


def _row_sums_seen_when_traced(width: int) -> bool:
    def program(x, w):
        return x @ w, jnp.asarray(xla_cpu.chunked_row_sums())

    return bool(xla_cpu.jit(program)(jnp.ones((256, width)), jnp.ones((width, width)))[1])


def test_only_programs_compiled_without_fusion_are_traced_with_chunked_row_sums(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not xla_cpu.chunked_row_sums()
    assert _row_sums_seen_when_traced(64) == xla_cpu._ynn_option_supported()
    assert not _row_sums_seen_when_traced(512)
    assert not xla_cpu.chunked_row_sums()  # the setting ends with the trace
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.YNN_FUSION_OPTION}=")  # the user's own "off" counts
    assert _row_sums_seen_when_traced(512)
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.YNN_FUSION_OPTION}=dot")
    assert not _row_sums_seen_when_traced(64)
