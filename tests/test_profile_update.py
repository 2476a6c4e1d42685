"""The update profile: it reads XLA's compiled program correctly (products told apart from their
gradients, the random-number loops found) and counts a loop's body once, as part of the loop."""

import jax
import jax.numpy as jnp

from experiments.profile_update import KINDS, kind_of, outermost_op_times, parse_hlo, product_time


def _layer_step_hlo() -> str:
    """Compiled HLO of a dense layer's loss gradient with a random draw in the loss."""

    def loss(weights, inputs, key):
        noise = jax.random.normal(key, (inputs.shape[0], weights.shape[1]))
        return jnp.sum(jnp.tanh(inputs @ weights) * noise)

    args = (jnp.ones((64, 32)), jnp.ones((128, 64)), jax.random.PRNGKey(0))
    return jax.jit(jax.grad(loss)).lower(*args).compile().as_text()


def test_compiled_layer_step_has_a_forward_product_a_gradient_product_and_random_numbers():
    instructions = parse_hlo(_layer_step_hlo())
    kinds = {kind_of(instruction) for instruction in instructions.values()}
    assert kinds == set(KINDS)
    products = [i for i in instructions.values() if kind_of(i).endswith("product")]
    assert {p.shape.split("{")[0] for p in products if kind_of(p) == "gradient product"} == {"f32[64,32]"}


def test_ops_nested_in_a_traced_op_on_the_same_thread_are_counted_with_it():
    instructions = parse_hlo(_layer_step_hlo())
    loop = next(name for name, i in instructions.items() if kind_of(i) == "random numbers")
    body, other = [name for name, i in instructions.items() if kind_of(i) == "other"][:2]
    events = [
        {"ph": "X", "name": loop, "ts": 0.0, "dur": 10.0, "pid": 1, "tid": 1},
        {"ph": "X", "name": body, "ts": 2.0, "dur": 3.0, "pid": 1, "tid": 1},  # inside the loop
        {"ph": "X", "name": other, "ts": 4.0, "dur": 7.0, "pid": 1, "tid": 2},  # concurrent, other thread
        {"ph": "X", "name": body, "ts": 12.0, "dur": 1.0, "pid": 1, "tid": 1},  # after the loop
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0.0, "dur": 20.0, "pid": 1, "tid": 1},
    ]
    assert outermost_op_times(events, instructions) == {loop: 10.0, body: 1.0, other: 7.0}


def test_isolated_product_time_scales_with_the_work():
    small = product_time(lambda x, w: x @ w, jnp.ones((256, 16)), jnp.ones((16, 16)), 200)
    large = product_time(lambda x, w: x @ w, jnp.ones((256, 256)), jnp.ones((256, 256)), 200)
    assert 0 < small < large
