"""Tests of the orbit-correction surrogate against the reference numbers of specs/beam.md."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.beam import (
    NOMINAL_SOLENOID_SETTINGS,
    NUM_READINGS,
    OrbitCorrectionCore,
    OrbitParams,
    drift_matrix,
    expert_pseudo_inverse,
    make_orbit_env,
    nominal_errors,
    nominal_params,
    noisy_svd_expert_action,
    orbit_reward,
    randomised_params,
    response_matrix,
    rms_orbit,
    sample_errors,
    solenoid_matrix,
    svd_expert_action,
    track_readings,
    trend_score,
)
from envs.jax_env import GymnasiumFace, step_autoreset

HORIZON = 50
# Every batched test uses this many environments, so each batched program compiles once.
NUM_ENVS = 2000
SYMPLECTIC_FORM = np.kron(np.eye(2), np.array([[0.0, 1.0], [-1.0, 0.0]]))
CORE = OrbitCorrectionCore()
# Compiled once and shared: the nominal and randomised parameters have the same pytree structure.
RESET = jax.jit(CORE.reset)
STEP = jax.jit(CORE.step)
BATCH_RESET = jax.jit(jax.vmap(CORE.reset, in_axes=(0, None)))
BATCH_STEP = jax.jit(jax.vmap(CORE.step, in_axes=(0, 0, 0, None)))
EXPERT = jax.jit(svd_expert_action)


def batch_reset(key: jax.Array, params: OrbitParams) -> tuple[jax.Array, object]:
    """Reset NUM_ENVS environments from one key."""
    return BATCH_RESET(jax.random.split(key, NUM_ENVS), params)


def expert_episodes(
    key: jax.Array, params: OrbitParams, gain: float
) -> tuple[np.ndarray, np.ndarray]:
    """Run the SVD expert for HORIZON steps in NUM_ENVS envs; (terminated, truncated) per step.

    Environments are not reset after success, so only flags up to the first success are an
    episode's own.
    """
    key_reset, key_steps = jax.random.split(key)
    obs, states = batch_reset(key_reset, params)
    pseudo_inverse = expert_pseudo_inverse()
    terminated, truncated = [], []
    for step_key in jax.random.split(key_steps, HORIZON):
        actions = EXPERT(obs, pseudo_inverse, gain)
        result = BATCH_STEP(jax.random.split(step_key, NUM_ENVS), states, actions, params)
        obs, states = result.obs, result.state
        terminated.append(np.asarray(result.terminated))
        truncated.append(np.asarray(result.truncated))
    return np.stack(terminated, axis=1), np.stack(truncated, axis=1)


def steps_to_success(terminated: np.ndarray) -> np.ndarray:
    """1-based step of the first success per episode (HORIZON + 1 where none)."""
    return np.where(terminated.any(axis=1), terminated.argmax(axis=1) + 1, HORIZON + 1)


# --- optics --------------------------------------------------------------------------------------


def test_magnetic_rigidity_matches_reference() -> None:
    rigidity = nominal_params().rigidity
    assert rigidity == pytest.approx(0.5587, abs=5e-4)
    assert rigidity * 299.792458 * 12 == pytest.approx(2010.08, abs=0.05)  # p in MeV/c


def test_solenoid_maps_are_symplectic_and_drift_at_zero_field() -> None:
    with jax.enable_x64(True):
        rigidity = nominal_params().rigidity
        for field in (-3.0, -0.7, 0.3, 2.172, 5.0):
            for length in (0.125, 0.25, 1.0):
                transfer = np.asarray(solenoid_matrix(field, length, rigidity))
                assert transfer.dtype == np.float64
                np.testing.assert_allclose(
                    transfer.T @ SYMPLECTIC_FORM @ transfer, SYMPLECTIC_FORM, rtol=0, atol=1e-12
                )
        for length in (0.125, 0.25):
            np.testing.assert_array_equal(
                np.asarray(solenoid_matrix(0.0, length, rigidity)), np.asarray(drift_matrix(length))
            )


def test_solenoid_rotations_and_larmor_phase_advances() -> None:
    params = nominal_params()
    fields = np.asarray(NOMINAL_SOLENOID_SETTINGS) * params.reference_field
    rotation = fields / (2 * params.rigidity) * params.solenoid_length
    np.testing.assert_allclose(rotation, [0.486, -0.486, -0.498, -0.534, -0.450], atol=1e-3)

    # The cell map is a Larmor rotation times a decoupled focusing map, so its eigenphases are
    # mu +- kL and the Larmor phase advance mu is their mean.
    half = 0.5 * params.solenoid_length
    advances = []
    for field in fields:
        cell = (
            drift_matrix(params.drift_after_solenoid)
            @ solenoid_matrix(field, half, params.rigidity)
            @ solenoid_matrix(field, half, params.rigidity)
            @ drift_matrix(params.drift_before_solenoid)
        )
        eigenphases = np.abs(np.angle(np.linalg.eigvals(np.asarray(cell, np.float64))))
        advances.append(np.degrees(eigenphases).mean())
    np.testing.assert_allclose(advances, [45.0, 45.0, 46.1, 49.6, 41.6], atol=0.06)


def test_nominal_response_matrix_reference_properties() -> None:
    response = np.asarray(response_matrix(nominal_params()))
    for block_row in range(5):
        for block_col in range(block_row + 1, 5):
            block = response[2 * block_row : 2 * block_row + 2, 2 * block_col : 2 * block_col + 2]
            assert np.all(block == 0.0), "corrector j must not move upstream BPMs"
        diagonal = response[2 * block_row : 2 * block_row + 2, 2 * block_row : 2 * block_row + 2]
        # The x-y coupling of a block follows the sign of its solenoid's field.
        coupling_sign = np.sign(NOMINAL_SOLENOID_SETTINGS[block_row])
        reference_block = [[0.41, 0.10 * coupling_sign], [-0.10 * coupling_sign, 0.41]]
        np.testing.assert_allclose(diagonal, reference_block, atol=0.011)
    singular_values = np.linalg.svd(response, compute_uv=False)
    np.testing.assert_allclose(
        singular_values,
        [1.642, 1.642, 1.460, 1.460, 0.396, 0.396, 0.161, 0.161, 0.085, 0.085],
        atol=1e-3,
    )
    assert singular_values[0] / singular_values[-1] == pytest.approx(19.3, abs=0.1)


def test_orbit_is_affine_in_settings_and_matches_finite_differences() -> None:
    params = nominal_params()
    errors = sample_errors(jax.random.PRNGKey(3), params)
    response = np.asarray(response_matrix(params, errors))
    error_orbit = np.asarray(track_readings(jnp.zeros(NUM_READINGS), errors, params))
    settings = np.linspace(-5.0, 5.0, NUM_READINGS, dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(track_readings(jnp.asarray(settings), errors, params)),
        response @ settings + error_orbit,
        atol=1e-4,
    )
    finite_differences = np.stack(
        [
            np.asarray(track_readings(jnp.eye(NUM_READINGS)[j], errors, params)) - error_orbit
            for j in range(NUM_READINGS)
        ],
        axis=1,
    )
    np.testing.assert_allclose(finite_differences, response, atol=1e-5)


def test_initial_orbit_and_exact_correction_distributions() -> None:
    params = nominal_params()
    obs, _ = batch_reset(jax.random.PRNGKey(2024), params)
    obs = np.asarray(obs, np.float64)
    # Without noise b_{-1} = b_0 - delta b_0 is the orbit at theta = 0 of each reset's errors.
    error_orbits = obs[:, 2 * NUM_READINGS :] - obs[:, NUM_READINGS : 2 * NUM_READINGS]
    initial_rms = np.sqrt(np.mean(error_orbits**2, axis=1))
    assert np.median(initial_rms) == pytest.approx(1.81, abs=0.1)
    np.testing.assert_allclose(np.percentile(initial_rms, [10, 90]), [1.15, 2.54], atol=0.1)

    exact_correction = -np.linalg.solve(np.asarray(response_matrix(params)), error_orbits.T).T
    largest_setting = np.abs(exact_correction).max(axis=1)
    assert np.median(largest_setting) == pytest.approx(6.1, abs=0.3)
    assert np.percentile(largest_setting, 99) == pytest.approx(10.9, abs=0.6)
    assert largest_setting.max() < params.setting_limit


# --- MDP -----------------------------------------------------------------------------------------


def test_reset_applies_probe_and_starts_trend_at_zero() -> None:
    params = nominal_params()
    obs, state = RESET(jax.random.PRNGKey(7), params)
    obs = np.asarray(obs)
    assert obs.shape == (30,) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:NUM_READINGS], 0.0)
    probe_response = 0.3 * np.asarray(response_matrix(params)) @ np.ones(NUM_READINGS)
    np.testing.assert_allclose(obs[NUM_READINGS : 2 * NUM_READINGS], probe_response, atol=1e-5)
    np.testing.assert_allclose(
        obs[2 * NUM_READINGS :], np.asarray(track_readings(state.settings, state.errors, params))
    )
    np.testing.assert_allclose(np.asarray(state.settings), 0.3)
    assert int(state.step_count) == 0


def test_reward_trend_term_and_success_bonus() -> None:
    params = nominal_params()
    previous = jnp.full(NUM_READINGS, 2.0)
    for scale, weighted_trend in ((0.9, 0.04), (1.1, -0.16), (1.0, -0.16)):
        score = trend_score(previous * scale, previous)
        assert float(params.trend_weight * score) == pytest.approx(weighted_trend)

    decreased = jnp.full(NUM_READINGS, 1.5)
    reward, success = orbit_reward(decreased, previous, jnp.array(1), params)
    assert not bool(success)
    assert float(reward) == pytest.approx(-1.5 + 0.04, abs=1e-6)

    corrected = jnp.full(NUM_READINGS, 0.2)
    for step, bonus in ((1, 200.0), (2, 197.0), (50, 53.0)):
        reward, success = orbit_reward(corrected, previous, jnp.array(step), params)
        assert bool(success)
        assert float(reward) == pytest.approx(bonus - 0.2 + 0.04, abs=1e-4)


def test_step_reward_matches_observation() -> None:
    params = randomised_params()
    obs, state = RESET(jax.random.PRNGKey(11), params)
    action = jnp.linspace(-1.0, 1.0, NUM_READINGS)
    result = STEP(jax.random.PRNGKey(12), state, action, params)
    readings = np.asarray(result.obs[2 * NUM_READINGS :])
    previous = np.asarray(obs[2 * NUM_READINGS :])
    np.testing.assert_allclose(
        np.asarray(result.obs[:NUM_READINGS]), obs[NUM_READINGS : 2 * NUM_READINGS]
    )
    np.testing.assert_allclose(
        np.asarray(result.obs[NUM_READINGS : 2 * NUM_READINGS]), readings - previous, atol=1e-6
    )
    trend = np.sum(np.where(np.abs(readings) < np.abs(previous), 1.0, -4.0)) / NUM_READINGS**2
    expected = -np.sqrt(np.mean(readings**2)) + 0.4 * trend
    assert float(result.reward) == pytest.approx(expected, abs=1e-5)
    assert float(result.info["rms"]) == pytest.approx(np.sqrt(np.mean(readings**2)), abs=1e-6)


def test_settings_and_actions_are_clipped() -> None:
    params = nominal_params()
    _, state = RESET(jax.random.PRNGKey(0), params)
    result = STEP(jax.random.PRNGKey(1), state, jnp.full(NUM_READINGS, 5.0), params)
    np.testing.assert_allclose(np.asarray(result.state.settings), 1.3)
    state = result.state.replace(settings=jnp.full(NUM_READINGS, 39.5))
    result = STEP(jax.random.PRNGKey(2), state, jnp.ones(NUM_READINGS), params)
    np.testing.assert_array_equal(np.asarray(result.state.settings), 40.0)


def test_truncated_exactly_at_horizon_without_success() -> None:
    params = nominal_params()
    obs, state = RESET(jax.random.PRNGKey(5), params)
    assert float(rms_orbit(obs[2 * NUM_READINGS :])) > 0.5
    for step_number in range(1, HORIZON + 1):
        result = STEP(jax.random.PRNGKey(step_number), state, jnp.zeros(NUM_READINGS), params)
        state = result.state
        assert not bool(result.terminated)
        assert bool(result.truncated) == (step_number == HORIZON)
    assert int(state.step_count) == HORIZON


def test_success_terminates_and_is_never_truncated() -> None:
    params = nominal_params()
    _, state = RESET(jax.random.PRNGKey(6), params)
    exact = -jnp.linalg.solve(
        response_matrix(params), track_readings(jnp.zeros(NUM_READINGS), state.errors, params)
    )
    at_horizon = state.replace(settings=exact, step_count=jnp.array(HORIZON - 1, jnp.int32))
    result = STEP(jax.random.PRNGKey(0), at_horizon, jnp.zeros(NUM_READINGS), params)
    assert bool(result.terminated) and not bool(result.truncated)
    assert float(result.reward) > 53.0 - 0.2
    assert float(result.info["true_rms"]) < 1e-3


def test_domain_randomisation_ranges_and_noise() -> None:
    params = randomised_params()
    key = jax.random.PRNGKey(9)
    noisy_obs, states = batch_reset(key, params)
    # Same keys without noise: the errors are identical, so the difference is the BPM noise.
    clean_obs, clean_states = batch_reset(key, params.replace(bpm_noise_std=0.0))
    np.testing.assert_array_equal(
        np.asarray(states.errors.solenoid_offsets), np.asarray(clean_states.errors.solenoid_offsets)
    )
    noise = np.asarray(noisy_obs - clean_obs)[:, 2 * NUM_READINGS :]
    assert noise.std() == pytest.approx(0.05, rel=0.03)
    assert abs(noise.mean()) < 0.002

    errors = states.errors
    scale = np.asarray(errors.solenoid_scale)
    gains = np.asarray(errors.corrector_gains)
    assert 0.95 <= scale.min() < 0.951 and 1.049 < scale.max() <= 1.05
    assert 0.9 <= gains.min() < 0.901 and 1.099 < gains.max() <= 1.1
    offsets = np.asarray(errors.solenoid_offsets)
    assert -3.0 <= offsets.min() < -2.99 and 2.99 < offsets.max() <= 3.0
    injection = np.asarray(errors.injection_offset)
    assert -0.6 <= injection.min() < -0.59 and 0.59 < injection.max() <= 0.6

    one_machine = jax.tree.map(lambda leaf: leaf[0], errors)
    assert not np.allclose(
        np.asarray(response_matrix(params)), np.asarray(response_matrix(params, one_machine))
    )


# --- SVD expert ----------------------------------------------------------------------------------


def test_expert_pseudo_inverse_keeps_all_singular_values() -> None:
    response = np.asarray(response_matrix(nominal_params()))
    np.testing.assert_allclose(
        np.asarray(expert_pseudo_inverse()) @ response, np.eye(NUM_READINGS), atol=1e-4
    )


@pytest.mark.parametrize(
    ("params", "label"), [(nominal_params(), "nominal"), (randomised_params(), "perturbed")]
)
def test_svd_expert_solves_the_task(params: OrbitParams, label: str) -> None:
    """Acceptance check 7 on NUM_ENVS episodes; the first 200 are reported as well."""
    terminated, truncated = expert_episodes(jax.random.PRNGKey(100), params, 0.7)
    first = steps_to_success(terminated)
    for count in (200, NUM_ENVS):
        print(
            f"SVD expert g=0.7 ({label}, {count} episodes): "
            f"success {np.mean(first[:count] <= HORIZON):.3f}, median steps "
            f"{np.median(first[:count]):.0f}, 90% <= {np.percentile(first[:count], 90):.0f}, "
            f"99% <= {np.percentile(first[:count], 99):.0f}"
        )
    assert np.mean(first <= HORIZON) >= 0.99
    assert np.median(first) <= 6
    before_success = np.arange(1, HORIZON + 1) <= first[:, None]
    assert not truncated[before_success].any(), "a successful episode is never truncated"


def test_svd_expert_reference_computation() -> None:
    """Section 4.6 step statistics, 2,000 episodes each (spec: 2,000 nominal, 1,000 randomised)."""
    terminated, _ = expert_episodes(jax.random.PRNGKey(200), nominal_params(), 0.7)
    first = steps_to_success(terminated)
    assert np.all(first <= HORIZON)
    # The reference median (4) lies on the 4/5 boundary: about half the episodes need <= 4 steps.
    assert np.mean(first <= 4) == pytest.approx(0.5, abs=0.05)
    assert np.percentile(first, 90) <= 7 and np.percentile(first, 99) <= 9
    for gain in (0.5, 0.7, 1.0):
        terminated, _ = expert_episodes(jax.random.PRNGKey(201), randomised_params(), gain)
        first = steps_to_success(terminated)
        assert np.all(first <= HORIZON)
        assert np.median(first) == 5
        assert np.percentile(first, 90) <= 7 and np.percentile(first, 99) <= 10


def test_noisy_expert() -> None:
    pseudo_inverse = expert_pseudo_inverse()
    obs, _ = batch_reset(jax.random.PRNGKey(1), nominal_params())
    clean = EXPERT(obs, pseudo_inverse, 0.7)
    key = jax.random.PRNGKey(2)
    np.testing.assert_array_equal(
        np.asarray(noisy_svd_expert_action(key, obs, pseudo_inverse, 0.7, 0.0)), np.asarray(clean)
    )
    noisy = np.asarray(noisy_svd_expert_action(key, obs, pseudo_inverse, 0.7, 0.3))
    assert noisy.shape == (NUM_ENVS, NUM_READINGS)
    assert np.abs(noisy).max() <= 1.0
    assert not np.allclose(noisy, np.asarray(clean))


# --- faces and vectorisation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def randomised_env() -> GymnasiumFace:
    """One gymnasium env shared by the face tests (its jitted reset/step compile once)."""
    return make_orbit_env(domain_randomisation=True)


def test_gymnasium_env_checker_passes(randomised_env: GymnasiumFace) -> None:
    check_env(randomised_env, skip_render_check=True)
    # The nominal lattice runs the same compiled code with other parameter values.
    randomised_env.params = nominal_params()
    try:
        check_env(randomised_env, skip_render_check=True)
    finally:
        randomised_env.params = randomised_params()


def test_make_orbit_env_overrides_and_rejects_unknown_fields() -> None:
    env = make_orbit_env(domain_randomisation=True, bpm_noise_std=0.0)
    assert env.params.bpm_noise_std == 0.0 and env.params.solenoid_scale_halfwidth == 0.05
    assert make_orbit_env().params.solenoid_scale_halfwidth == 0.0
    with pytest.raises(ValueError, match="bpm_noise"):
        make_orbit_env(bpm_noise=0.1)
    with pytest.raises(ValueError, match="bpm_noise_std"):
        make_orbit_env(bpm_noise_std=-1.0)


def test_jit_vmap_step_matches_single_steps() -> None:
    params = randomised_params()
    obs, states = batch_reset(jax.random.PRNGKey(21), params)
    reset_keys = jax.random.split(jax.random.PRNGKey(21), NUM_ENVS)
    actions = jax.random.uniform(
        jax.random.PRNGKey(22), (NUM_ENVS, NUM_READINGS), minval=-1.0, maxval=1.0
    )
    step_keys = jax.random.split(jax.random.PRNGKey(23), NUM_ENVS)
    batched = BATCH_STEP(step_keys, states, actions, params)
    for index in range(0, NUM_ENVS, 211):
        single_obs, single_state = RESET(reset_keys[index], params)
        np.testing.assert_allclose(np.asarray(obs[index]), np.asarray(single_obs), atol=1e-6)
        result = STEP(step_keys[index], single_state, actions[index], params)
        np.testing.assert_allclose(
            np.asarray(batched.obs[index]), np.asarray(result.obs), atol=1e-6
        )
        assert float(batched.reward[index]) == pytest.approx(float(result.reward), abs=1e-5)
        assert bool(batched.terminated[index]) == bool(result.terminated)
        assert bool(batched.truncated[index]) == bool(result.truncated)


def test_step_autoreset_keeps_solving_fresh_lattices() -> None:
    params = nominal_params()
    obs, state = RESET(jax.random.PRNGKey(30), params)
    pseudo_inverse = expert_pseudo_inverse()
    autoreset_step = jax.jit(
        lambda key, state, action: step_autoreset(CORE, key, state, action, params)
    )
    successes = 0
    for step_key in jax.random.split(jax.random.PRNGKey(31), 30):
        action = EXPERT(obs, pseudo_inverse, 0.7)
        result, final_obs = autoreset_step(step_key, state, action)
        obs, state = result.obs, result.state
        if bool(result.terminated):
            successes += 1
            # The true last observation is the corrected orbit; the returned one a fresh reset.
            assert float(rms_orbit(final_obs[2 * NUM_READINGS :])) < 0.5
            assert int(state.step_count) == 0
            assert not np.allclose(np.asarray(obs), np.asarray(final_obs))
    assert successes >= 3


def test_gymnasium_face_matches_core_step_for_step(randomised_env: GymnasiumFace) -> None:
    params = randomised_params()
    env = randomised_env
    env_obs, info = env.reset(seed=42)
    assert info == {}
    key = jax.random.PRNGKey(42)
    key, reset_key = jax.random.split(key)
    core_obs, state = RESET(reset_key, params)
    np.testing.assert_allclose(env_obs, np.asarray(core_obs), atol=1e-6)
    pseudo_inverse = expert_pseudo_inverse()
    for _ in range(HORIZON):
        action = np.asarray(EXPERT(jnp.asarray(env_obs), pseudo_inverse, 0.5))
        env_obs, reward, terminated, truncated, info = env.step(action)
        key, step_key = jax.random.split(key)
        result = STEP(step_key, state, jnp.asarray(action), params)
        state = result.state
        np.testing.assert_allclose(env_obs, np.asarray(result.obs), atol=1e-5)
        assert reward == pytest.approx(float(result.reward), abs=1e-4)
        assert terminated == bool(result.terminated) and truncated == bool(result.truncated)
        assert set(info) == {"rms", "true_rms", "is_success"}
        if terminated or truncated:
            break
    assert terminated and not truncated


def test_spaces() -> None:
    env = make_orbit_env()
    assert env.observation_space == gym.spaces.Box(-10.0, 10.0, (30,), np.float32)
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (10,), np.float32)
    assert nominal_errors().corrector_gains.shape == (NUM_READINGS,)
