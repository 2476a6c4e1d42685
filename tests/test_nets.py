"""Networks: ensembles on a parameter axis, REDQ subset minimum, tanh-Gaussian log-probabilities."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.distributions import tanh_gaussian, tanh_gaussian_mode
import flax.linen as nn

from rl import xla_cpu
from rl.nets import (MLP, Dense, LayerNorm, StateActionValue, dense_dot_general, dense_product, ensemble, orthogonal,
                     chunked_row_sum, subset_min)


def test_ensemble_members_have_independent_parameters_on_a_leading_axis():
    net = ensemble(StateActionValue, 10)((32, 32), layer_norm=True)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 2)))["params"]
    kernel = params["MLP_0"]["Dense_0"]["kernel"]
    assert kernel.shape == (10, 7, 32)
    assert not np.allclose(kernel[0], kernel[1])
    assert "LayerNorm_0" in params["MLP_0"]
    q = net.apply({"params": params}, jnp.ones((4, 5)), jnp.ones((4, 2)))
    assert q.shape == (10, 4)


def test_layer_norm_is_absent_unless_requested():
    params = MLP((8,)).init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]
    assert list(params) == ["Dense_0"]


def with_chunked_row_sums(fn):
    """``fn`` traced as ``rl.xla_cpu.jit`` traces programs it compiles with YNNPACK fusion off."""
    return xla_cpu._traced_with_chunked_row_sums(fn)


@pytest.mark.parametrize("shape", [(64,), (40, 16), (40, 48), (3, 40, 100), (40, 128), (2, 40, 256)])
def test_layer_norm_matches_flax_in_values_gradients_and_parameter_names(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 * rng.standard_normal(shape) + 1.0, jnp.float32)
    params = nn.LayerNorm().init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, LayerNorm().init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda leaf: leaf + jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32), params)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module().apply(p, x)))

    want = jax.value_and_grad(loss(nn.LayerNorm), argnums=(0, 1))(params, x)
    plain = jax.jit(jax.value_and_grad(loss(LayerNorm), argnums=(0, 1)))
    chunked = jax.jit(with_chunked_row_sums(jax.value_and_grad(loss(LayerNorm), argnums=(0, 1))))
    for got in (plain(params, x), chunked(params, x)):
        for leaf, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(leaf, expected, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))


@pytest.mark.parametrize("width", [8, 32, 64, 100, 256])
def test_chunked_row_sum_equals_the_plain_sum(width):
    x = jnp.asarray(np.random.default_rng(width).standard_normal((5, 7, width)), jnp.float32)
    chunked = jax.jit(chunked_row_sum)(x)
    assert chunked.shape == (5, 7, 1)
    np.testing.assert_allclose(chunked, jnp.sum(x, axis=-1, keepdims=True), rtol=1e-5, atol=1e-5)


def feature_axis_windows(compiled_text: str) -> list[str]:
    """The ``reduce-window`` windows of a compiled program that run along the last axis."""
    return [w for w in re.findall(r"reduce-window\(.*window=\{size=([\dx]+) ", compiled_text) if not w.endswith("x1")]


def test_chunked_layer_norm_leaves_xla_no_windowed_reductions_over_features():
    """XLA's CPU backend splits feature sums longer than 32 into slow ``reduce-window`` kernels
    when YNNPACK does not run them; the chunked form (forward and backward) avoids them."""
    x, params = jnp.ones((256, 128)), LayerNorm().init(jax.random.PRNGKey(0), jnp.ones((1, 128)))
    step = jax.grad(lambda p, x: jnp.sum(jnp.sin(LayerNorm().apply(p, x))), argnums=(0, 1))
    options = {xla_cpu.YNN_FUSION_OPTION: ""} if xla_cpu._ynn_option_supported() else None
    plain = jax.jit(step, compiler_options=options).lower(params, x).compile().as_text()
    chunked = jax.jit(with_chunked_row_sums(step), compiler_options=options).lower(params, x).compile().as_text()
    if not feature_axis_windows(plain):
        pytest.skip("this XLA does not window long feature sums: nothing for the chunked form to avoid")
    assert feature_axis_windows(chunked) == []


def test_subset_min_without_replacement_over_full_ensemble_is_the_minimum():
    values = jnp.array([[3.0, 1.0], [2.0, 5.0]])
    np.testing.assert_array_equal(subset_min(values, jax.random.PRNGKey(0), 2, False), [2.0, 1.0])


def test_subset_min_with_replacement_duplicates_at_the_expected_rate():
    # E = 10, M = 2 with replacement: both draws equal with probability 1/10.
    draws = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 10))(jax.random.split(jax.random.PRNGKey(0), 100_000))
    duplicate_rate = float(jnp.mean(draws[:, 0] == draws[:, 1]))
    assert abs(duplicate_rate - 0.10) < 0.01
    values = jnp.arange(10.0)[:, None] * jnp.ones((1, 3))
    minimum = subset_min(values, jax.random.PRNGKey(1), 2, True)
    assert minimum.shape == (3,) and float(minimum[0]) in range(10)


def test_subset_larger_than_ensemble_without_replacement_is_rejected():
    with pytest.raises(ValueError, match="subset_size"):
        subset_min(jnp.zeros((2, 3)), jax.random.PRNGKey(0), 3, False)


def test_tanh_gaussian_log_prob_includes_the_tanh_jacobian():
    mean, log_std = jnp.array([0.3, -0.2]), jnp.array([-0.5, 0.1])
    distribution = tanh_gaussian(mean, log_std)
    action, log_prob = distribution.sample_and_log_prob(seed=jax.random.PRNGKey(0))
    pre_tanh = jnp.arctanh(action)
    std = jnp.exp(log_std)
    gaussian = -0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    expected = jnp.sum(gaussian - jnp.log(1 - action**2))
    np.testing.assert_allclose(log_prob, expected, rtol=1e-3)
    np.testing.assert_allclose(tanh_gaussian_mode(mean), jnp.tanh(mean))


@pytest.mark.parametrize("shape_in, width_out", [((64, 256), 6), ((64, 17), 32), ((64, 32), 32), ((3, 8, 20), 4), ((20,), 4)])
def test_dense_product_gradients_match_autodiff_for_thin_square_wide_and_batched_inputs(shape_in, width_out):
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.standard_normal(shape_in), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((shape_in[-1], width_out)), jnp.float32)

    def loss(product):
        return lambda x, w: jnp.sum(jnp.sin(product(x, w)))

    ours = jax.grad(loss(dense_product), argnums=(0, 1))(inputs, kernel)
    reference = jax.grad(loss(jnp.matmul), argnums=(0, 1))(inputs, kernel)
    np.testing.assert_array_equal(dense_product(inputs, kernel), inputs @ kernel)
    for got, want in zip(ours, reference):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dense_layer_keeps_flax_parameters_and_outputs_and_vmaps_over_an_ensemble():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 12)), jnp.float32)
    params = nn.Dense(3).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, Dense(3).init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(Dense(3).apply(params, x), nn.Dense(3).apply(params, x))

    critics = ensemble(StateActionValue, 2)((8,))
    observations, actions = x[:, :9], x[:, 9:]
    critic_params = critics.init(jax.random.PRNGKey(1), observations, actions)["params"]

    def action_loss(a):
        return critics.apply({"params": critic_params}, observations, a).sum()

    grad_actions = jax.grad(action_loss)(actions)
    members = [jax.tree.map(lambda leaf: leaf[i], critic_params) for i in range(2)]
    plain = StateActionValue((8,))
    want = sum(jax.grad(lambda a, p=p: plain.apply({"params": p}, observations, a).sum())(actions) for p in members)
    np.testing.assert_allclose(grad_actions, want, rtol=1e-5, atol=1e-6)


def test_dense_dot_general_passes_other_contractions_to_lax():
    lhs, rhs = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(lhs, rhs, batched), jax.lax.dot_general(lhs, rhs, batched))


@pytest.mark.parametrize("shape", [(17, 256), (256, 256), (256, 6), (6, 300), (4, 5, 7)])
def test_orthogonal_init_draws_the_values_of_jax_orthogonal_alone_and_vmapped(shape):
    keys = jax.random.split(jax.random.PRNGKey(3), 6).reshape(2, 3, 2)
    for scale in (1.0, 0.01):
        ours, theirs = orthogonal(scale), nn.initializers.orthogonal(scale)
        np.testing.assert_array_equal(ours(keys[0, 0], shape), theirs(keys[0, 0], shape))
        nested = [jax.jit(jax.vmap(jax.vmap(lambda key: init(key, shape))))(keys) for init in (ours, theirs)]
        np.testing.assert_array_equal(*nested)


def lapack_operand_shapes(compiled_text: str) -> list[str]:
    return re.findall(r"= \(?(f32\[[\d,]*\])[^=]*custom-call\([^)]*\), custom_call_target=\"lapack_", compiled_text)


def test_vmapped_orthogonal_init_factors_one_matrix_per_lapack_call():
    """A batched LAPACK call can deadlock XLA's CPU thread pool (see ``qr_one_matrix_at_a_time``)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)

    def compiled(init):
        return jax.jit(jax.vmap(lambda key: init(key, (128, 128)))).lower(keys).compile().as_text()

    assert lapack_operand_shapes(compiled(nn.initializers.orthogonal())) == ["f32[4,128,128]"] * 2  # what we avoid
    assert lapack_operand_shapes(compiled(orthogonal())) == ["f32[128,128]"] * 2
