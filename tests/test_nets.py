"""Networks: ensembles on a parameter axis, REDQ subset minimum, tanh-Gaussian log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.distributions import tanh_gaussian, tanh_gaussian_mode
from rl.nets import MLP, StateActionValue, ensemble, subset_min


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
