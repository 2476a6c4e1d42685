"""The update-throughput benchmark: its arithmetic bound counts the FLOPs of one SAC update
correctly, its products-only row runs exactly the update's products, its timed windows alternate
between cells, its peers compile with JAX's default threefry lowering, and its plain-JAX reference
row does the same work as o2o and learns."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plain_jax_sac
from experiments.bench_updates import (ACT_DIM, BATCH, OBS_DIM, Args, Cell, compiled_flops, compiled_update,
                                       measure_interleaved, plain_jax_buffer, products_only_cell, update_flops,
                                       with_jax_default_threefry)
from experiments.hlo import compiled_products
from rl.prng import unrolled_threefry


def test_update_flop_count_matches_hand_count_of_dense_products():
    critic_macs = (OBS_DIM + ACT_DIM) * 256 + 256 * 256 + 256  # one member, per sample
    actor_macs = OBS_DIM * 256 + 256 * 256 + 256 * 2 * ACT_DIM
    per_sample = (
        actor_macs + 2 * critic_macs  # target: next actions, two target critics
        + 2 * critic_macs * 3  # critic loss: forward, input and weight gradients
        + actor_macs * 3  # actor loss: actor forward and backward
        + 2 * critic_macs * 2  # critics forward and backward to the actions
    )
    hand_count = 2 * per_sample * BATCH
    assert abs(update_flops() / hand_count - 1) < 0.05


def test_compiled_products_reads_operand_shapes_and_dimension_numbers():
    def program(x, w, a, b):
        return jnp.tanh(x @ w).sum() + jnp.einsum("eib,eio->ebo", a, b).sum()

    operands = (jnp.ones((8, 5)), jnp.ones((5, 3)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 6)))
    products = compiled_products(jax.jit(program).lower(*operands).compile())
    found = sorted((p.lhs_shape, p.rhs_shape, p.flops) for p in products)
    assert found == sorted([((8, 5), (5, 3), 2 * 8 * 5 * 3), ((2, 4, 8), (2, 4, 6), 2 * 2 * 8 * 4 * 6)])


def test_products_only_row_runs_every_product_of_the_update_and_nothing_else():
    products = compiled_products(compiled_update())
    # XLA's count adds the element-wise work to the products': a few per cent on top.
    assert 0.95 < sum(p.flops for p in products) / update_flops() <= 1.0
    cell = products_only_cell(Args(k=2))
    assert cell.library == "products-only" and cell.call() == 2


def _plain_jax_setup() -> tuple[plain_jax_sac.PlainSACState, plain_jax_sac.Buffer]:
    """A fresh reference state and a 512-transition random buffer."""
    return plain_jax_sac.init_state(jax.random.PRNGKey(0), OBS_DIM, ACT_DIM), plain_jax_buffer(512)


def test_plain_jax_reference_does_the_same_arithmetic_as_the_o2o_update():
    state, buffer = _plain_jax_setup()
    compiled = jax.jit(plain_jax_sac.update).lower(state, buffer, jax.random.PRNGKey(0)).compile()
    assert abs(compiled_flops(compiled) / update_flops() - 1) < 0.05


def test_plain_jax_reference_fits_a_fixed_critic_target():
    state, buffer = _plain_jax_setup()
    # Rewards 1 with every episode ending: the TD target is exactly 1 for every transition.
    buffer = buffer._replace(rewards=buffer.rewards * 0 + 1, terminated=buffer.terminated * 0 + 1)
    before = np.asarray(state.actor[0]["kernel"]).copy()
    state, losses = plain_jax_sac.compile_scan(300, 64)(state, buffer, jax.random.PRNGKey(1))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.1 * losses[:5].mean()
    assert not np.allclose(np.asarray(state.actor[0]["kernel"]), before)


def test_timed_windows_take_turns_so_every_cell_sees_the_same_machine():
    log = []

    def counting(name: str) -> Cell:
        def call() -> int:
            log.append(name)
            return 1

        return Cell(name, "scan", 1, call)

    cells = [counting("a"), counting("b")]
    measure_interleaved(cells, seconds=0.01, repeats=3)
    assert [len(cell.rates) for cell in cells] == [3, 3] and all(rate > 0 for cell in cells for rate in cell.rates)
    runs = [name for index, name in enumerate(log) if index == 0 or log[index - 1] != name]
    assert runs == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then one window per cell per round


def test_peer_cells_compile_with_jax_default_threefry_on_every_call():
    lowering_seen = []

    def call() -> int:
        lowering_seen.append(unrolled_threefry())
        return 1

    (peer,) = with_jax_default_threefry([Cell("peer", "scan", 1, call)])
    peer.call()
    peer.call()  # a jitted peer may be compiled again on a later call
    assert lowering_seen == [False, False]
    assert unrolled_threefry()  # o2o's own cells keep the unrolled lowering
