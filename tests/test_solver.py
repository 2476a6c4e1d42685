"""Tests of envs/solver.py against the reference numbers of specs/solver_bandit.md (sections 7 and 9)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from gymnasium.utils.env_checker import check_env

from envs import solver

# Spec 7.1: SOR iterations for b = 1 at omegas (1.0, 1.2, 1.4, 1.6, 1.8, 1.9, 1.95, Young ω*).
TABLE_OMEGAS = (1.0, 1.2, 1.4, 1.6, 1.8, 1.9, 1.95)
TABLE_ONES = {
    -0.15: (2927, 1950, 1252, 724, 293, 189, 392, 147),
    0.00: (223, 145, 88, 43, 89, 187, 383, 41),
    0.15: (119, 76, 42, 44, 91, 185, 381, 31),
    0.45: (64, 39, 25, 42, 89, 185, 379, 23),
}
# Spec 7.1 brackets: (min, max) over 5 truncated-normal right-hand sides from numpy default_rng(0).
TABLE_RANDOM = {
    -0.15: ((2324, 2630), (1550, 1753), (997, 1126), (580, 653), (240, 266), (177, 180), (361, 365), (125, 136)),
    0.00: ((181, 201), (120, 132), (68, 80), (40, 41), (85, 86), (176, 178), (361, 361), (37, 39)),
    0.15: ((96, 108), (55, 69), (34, 39), (40, 41), (85, 86), (176, 178), (361, 362), (27, 29)),
    0.45: ((47, 58), (32, 36), (25, 26), (40, 41), (85, 87), (176, 177), (361, 362), (22, 23)),
}


@jax.jit
def _sor_counts(shifts, rhs, omegas):
    with solver.float64_scope():
        return jax.vmap(lambda c, b, w: solver.sor_solve(c, b, w)[0])(shifts, rhs, omegas)


def _table_cells(rhs_list):
    shifts, omegas, rhs = [], [], []
    for shift in TABLE_ONES:
        for omega in (*TABLE_OMEGAS, solver.young_omega(shift)):
            for vector in rhs_list:
                shifts.append(shift)
                omegas.append(omega)
                rhs.append(vector)
    with solver.float64_scope():
        counts = _sor_counts(jnp.asarray(shifts), jnp.asarray(np.stack(rhs)), jnp.asarray(omegas))
    return np.asarray(counts).reshape(len(TABLE_ONES), len(TABLE_OMEGAS) + 1, len(rhs_list))


def _dense_laplacian(size: int) -> np.ndarray:
    identity = np.eye(size * size)
    with solver.float64_scope():
        columns = [np.asarray(solver.stencil_matvec(jnp.asarray(e.reshape(size, size)), 4.0, 1.0)).ravel() for e in identity]
    return np.stack(columns, axis=1)


def test_matrix_and_young_omega():
    """Check 1: n = 100, λ_min, Young's ω* (and the matrix the stencil applies is delsq's)."""
    matrix = _dense_laplacian(solver.LAPLACIAN_GRID)
    assert matrix.shape == (100, 100)
    eigenvalues = np.linalg.eigvalsh(matrix)
    low, high = solver.laplacian_eigen_bounds()
    assert eigenvalues[0] == pytest.approx(0.162028, abs=1e-6) and low == pytest.approx(0.162028, abs=1e-6)
    assert eigenvalues[-1] == pytest.approx(high, abs=1e-9) and high == pytest.approx(7.837972, abs=1e-6)
    assert np.count_nonzero(matrix[12]) == 5 and matrix[12, 11] == matrix[12, 2] == -1.0
    for shift, expected in [(-0.15, 1.8536), (0.0, 1.5604), (0.15, 1.4488), (0.45, 1.3279)]:
        assert solver.young_omega(shift) == pytest.approx(expected, abs=1e-4)


def test_arm_grid():
    """Check 4: 20 arms, spacing 0.05, endpoints 1.00 and 1.95."""
    assert solver.OMEGA_GRID.shape == (20,)
    np.testing.assert_allclose(np.diff(solver.OMEGA_GRID), 0.05, atol=1e-12)
    assert solver.OMEGA_GRID[0] == 1.0 and solver.OMEGA_GRID[-1] == pytest.approx(1.95, abs=1e-12)


def test_sor_reference_table_ones():
    """Check 2: every b = 1 cell of table 7.1 (± 1 iteration)."""
    counts = _table_cells([np.ones(100)])[..., 0]
    expected = np.array(list(TABLE_ONES.values()))
    assert np.max(np.abs(counts - expected)) <= 1, counts


def test_sor_reference_table_random_rhs():
    """Table 7.1 brackets: min–max over 5 truncated-normal right-hand sides of default_rng(0) (± 1)."""
    rng = np.random.default_rng(0)
    draws = []
    while len(draws) < 5:
        vector = rng.standard_normal(100)
        if np.linalg.norm(vector) <= 10.0:
            draws.append(vector)
    counts = _table_cells(draws)
    expected = np.array(list(TABLE_RANDOM.values()))
    assert np.max(np.abs(counts.min(axis=-1) - expected[..., 0])) <= 1
    assert np.max(np.abs(counts.max(axis=-1) - expected[..., 1])) <= 1


def test_sor_iteration_cap():
    """Check 3: a divergent configuration (ω = 2.05, c = 0) costs exactly max_iters."""
    count, _ = solver.sor_solve(0.0, np.ones(100), 2.05)
    assert int(count) == 10_000
    count, _ = solver.sor_solve(0.0, np.ones(100), 2.05, max_iters=50)
    assert int(count) == 50


def _dense_sor(matrix, rhs, omega, tol=1e-8, max_iters=10_000):
    """Textbook SOR with a dense forward substitution (scipy), as an independent reference."""
    splitting = np.diag(np.diag(matrix)) / omega + np.tril(matrix, -1)
    x = np.zeros_like(rhs)
    residual = rhs - matrix @ x
    initial = np.linalg.norm(residual)
    for iteration in range(1, max_iters + 1):
        x = x + scipy.linalg.solve_triangular(splitting, residual, lower=True)
        residual = rhs - matrix @ x
        if np.linalg.norm(residual) / initial < tol:
            return iteration, x
    return max_iters, x


def test_sor_matches_dense_reference():
    rng = np.random.default_rng(3)
    matrix = _dense_laplacian(10) + 0.07 * np.eye(100)
    rhs = rng.standard_normal(100)
    expected_count, expected_x = _dense_sor(matrix, rhs, 1.55)
    count, x = solver.sor_solve(0.07, rhs, 1.55)
    assert abs(int(count) - expected_count) <= 1
    np.testing.assert_allclose(np.asarray(x), expected_x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(matrix, rhs), rtol=1e-6, atol=1e-8)


def test_sweeps_are_exact_triangular_solves():
    """lower/upper sweeps = solves with D + ωL and its transpose; SSOR M⁻¹ = ω(2−ω) X⁻¹ D X⁻ᵀ."""
    size, diag, off, omega = 6, 3.7, 0.9, 1.3
    rng = np.random.default_rng(1)
    dense = 3.7 / 4.0 * _dense_laplacian(size)  # diagonal 3.7, off-diagonals −0.925
    dense = np.where(np.eye(size * size) > 0, diag, np.where(dense != 0, -off, 0.0))
    x_matrix = np.diag(np.diag(dense)) + omega * np.tril(dense, -1)
    rhs = rng.standard_normal(size * size)
    with solver.float64_scope():
        grid = jnp.asarray(rhs.reshape(size, size))
        lower = np.asarray(solver.lower_sweep(grid, diag, off, omega)).ravel()
        upper = np.asarray(solver.upper_sweep(grid, diag, off, omega)).ravel()
        ssor = np.asarray(solver.ssor_apply_inverse(grid, diag, off, omega)).ravel()
    np.testing.assert_allclose(lower, scipy.linalg.solve_triangular(x_matrix, rhs, lower=True), rtol=1e-12)
    np.testing.assert_allclose(upper, scipy.linalg.solve_triangular(x_matrix.T, rhs, lower=False), rtol=1e-12)
    preconditioner = x_matrix.T @ np.diag(1.0 / np.diag(dense)) @ x_matrix / (omega * (2.0 - omega))
    np.testing.assert_allclose(ssor, np.linalg.solve(preconditioner, rhs), rtol=1e-10)


def test_heat_first_step_counts():
    """Check 10 (first part): κ-forced first-step systems and the actual first step (spec 7.3)."""
    initial = solver.heat_initial_condition(25)
    assert initial.shape == (24, 24)
    omegas = (1.0, 1.3, 1.5, 1.75, 1.95)
    actual_kappa = float(solver.heat_coefficient(0.5 * solver.HEAT_DT))  # κ(dt/2) = 3.14e-4
    cells = [(0.1, w) for w in omegas] + [(10.0, w) for w in omegas] + [(actual_kappa, w) for w in (1.0, 1.5, 1.95)]
    with solver.float64_scope():
        kappas, cell_omegas = (jnp.asarray(column, jnp.float64) for column in zip(*cells))
        counts = jax.jit(jax.vmap(lambda k, w: solver.heat_step(initial, 0.0, w, coefficient=k)[0]))(kappas, cell_omegas)
    assert np.asarray(counts).tolist() == [3, 4, 4, 5, 5, 16, 12, 12, 18, 27, 1, 2, 2]
    assert actual_kappa == pytest.approx(3.14e-4, rel=1e-3)
    low, high = solver.heat_context_interval()
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(10.0, abs=1e-6)


def test_heat_step_solves_the_system():
    with solver.float64_scope():
        initial = solver.heat_initial_condition(8)
        diag, off, rhs = solver.crank_nicolson_system(initial, jnp.float64(0.3), 1e-3)
        count, u = solver.heat_step(initial, 0.3, 1.4, dt=1e-3)
        residual = rhs - solver.stencil_matvec(u, diag, off)
        assert float(jnp.linalg.norm(residual)) <= 1e-8 * float(jnp.linalg.norm(rhs)) and int(count) >= 1
        count_cg, u_cg = solver.heat_step(initial, 0.3, None, dt=1e-3)
        np.testing.assert_allclose(np.asarray(u_cg), np.asarray(u), atol=1e-7)


HEAT_TOTALS = {None: (85_422, 39, 17_038), 1.0: (32_800, 14, 6_528), 1.3: (29_802, 11, 5_914), 1.5: (32_296, 10, 6_432), 1.75: (44_898, 15, 8_918), 1.95: (63_050, 25, 12_562)}


@pytest.mark.parametrize("omega", [1.3])
def test_heat_simulation_total_fast(omega):
    """Check 10 for one ω within the default budget (the others are in the slow test)."""
    counts = np.asarray(jax.jit(lambda: solver.heat_simulation_costs(25, omega))())
    total, peak, first_period = HEAT_TOTALS[omega]
    assert abs(counts.sum() / total - 1) <= 0.005 and abs(counts[:1000].sum() / first_period - 1) <= 0.005
    assert abs(int(counts.max()) - peak) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("omega", [None, 1.0, 1.5, 1.75, 1.95])
def test_heat_simulation_totals(omega):
    """Check 10: 5,000-step totals within ± 0.5 % for CG and every fixed ω (spec 7.3)."""
    counts = np.asarray(jax.jit(lambda: solver.heat_simulation_costs(25, omega))())
    total, peak, first_period = HEAT_TOTALS[omega]
    assert abs(counts.sum() / total - 1) <= 0.005 and abs(counts[:1000].sum() / first_period - 1) <= 0.005
    assert abs(int(counts.max()) - peak) <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "distribution, seed, best_omegas, best_mean, optimal_mean, oracle_mean",
    [("high", 12345, (1.8,), 103.5, 56.7, 59.2), ("low", 54321, (1.65, 1.7), 60.5, 42.3, 43.8)],
)
def test_full_information_statistics(distribution, seed, best_omegas, best_mean, optimal_mean, oracle_mean):
    """Check 8 on the spec's reference instance sets (T = 5,000): best arm, its mean, Young's mean."""
    beta_a, beta_b = solver.CONTEXT_DISTRIBUTIONS[distribution]
    shifts, rhs = solver.numpy_instances(seed, 5000, beta_a, beta_b)
    table = solver.sor_cost_table(shifts, rhs)
    means = table.mean(axis=0)
    assert any(abs(solver.OMEGA_GRID[np.argmin(means)] - omega) < 1e-9 for omega in best_omegas)
    assert means.min() == pytest.approx(best_mean, rel=0.05)
    optimal = solver.sor_iterations_many(shifts, rhs, solver.young_omega(shifts))
    assert optimal.mean() == pytest.approx(optimal_mean, rel=0.05)
    assert table.min(axis=1).mean() == pytest.approx(oracle_mean, rel=0.05)


def test_sor_iterations_many_matches_direct_solves():
    shifts, rhs = solver.numpy_instances(7, 12, 0.5, 1.5)
    omegas = np.linspace(1.0, 1.9, 12)
    counts = solver.sor_iterations_many(shifts, rhs, omegas, chunk_size=5)
    with solver.float64_scope():
        direct = _sor_counts(jnp.asarray(shifts), jnp.asarray(rhs), jnp.asarray(omegas))
    assert counts.tolist() == np.asarray(direct).tolist()


def test_instance_samplers():
    rng_shifts, rng_rhs = solver.numpy_instances(0, 50, 2.0, 6.0)
    assert np.all((rng_shifts >= -0.15) & (rng_shifts <= 0.45)) and np.all(np.linalg.norm(rng_rhs, axis=1) <= 10.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    vectors = np.asarray(jax.jit(jax.vmap(lambda k: solver.sample_truncated_normal(k, 100, 10.0)))(keys))
    assert vectors.dtype == np.float64 and np.linalg.norm(vectors, axis=1).max() <= 10.0
    assert abs(vectors.mean()) < 0.05 and vectors.std() == pytest.approx(0.97, abs=0.03)  # truncation shrinks the spread
    shifts = np.asarray(jax.jit(lambda k: solver.sample_shifts(k, (4000,), 0.5, 1.5))(jax.random.PRNGKey(1)))
    assert shifts.dtype == np.float64 and shifts.min() >= -0.15 and shifts.max() <= 0.45
    # Beta(0.5, 1.5): mean 0.25, variance 0.0625, so the shift has mean 0 and std 0.6·0.25 = 0.15.
    assert shifts.mean() == pytest.approx(0.0, abs=0.01) and shifts.std() == pytest.approx(0.15, rel=0.05)


@pytest.fixture(scope="module")
def sor_full_env():
    return solver.make_sor_bandit_env(context_distribution="low", full_information=True, episode_length=4)


@pytest.fixture(scope="module")
def sor_continuous_env():
    return solver.make_sor_bandit_env(action_type="continuous", cost_reference="fixed", observe_previous_cost=True, fixed_cost_scale=50.0)


@pytest.fixture(scope="module")
def heat_full_env():
    return solver.make_heat_ssor_env(full_information=True, episode_length=3)


def _face_rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    trace, rewards, infos, truncations = [obs], [], [], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert terminated is False
        trace.append(obs)
        rewards.append(reward)
        infos.append(info)
        truncations.append(truncated)
    return np.stack(trace), np.array(rewards), infos, truncations


def _core_rollout(core, params, seed, actions):
    """The key stream of GymnasiumFace (reset(seed) then one split per call), as one lax.scan."""
    key = jax.random.PRNGKey(seed)
    key, reset_key = jax.random.split(key)
    obs, state = core.reset(reset_key, params)

    def advance(carry, action):
        key, state = carry
        key, step_key = jax.random.split(key)
        result = core.step(step_key, state, action, params)
        return (key, result.state), (result.obs, result.reward, result.truncated, result.info)

    _, (observations, rewards, truncated, info) = jax.lax.scan(advance, (key, state), actions)
    return jnp.concatenate([obs[None], observations]), rewards, truncated, info


def test_sor_env_jit_vmap_agree_with_gymnasium_face(sor_full_env):
    """A jitted, seed-vmapped scan over the core reproduces the gymnasium face exactly."""
    env = sor_full_env
    actions = np.array([0, 16, 12, 19], np.int32)
    seeds = (5, 6, 7)
    # vmap outside the core's while loops must be traced with x64 on (see the envs.solver docstring).
    with solver.float64_scope():
        batched = jax.jit(jax.vmap(lambda seed: _core_rollout(env.core, env.params, seed, jnp.asarray(actions))))(jnp.asarray(seeds))
    core_obs, core_rewards, core_truncated, core_info = (np.asarray(x) if not isinstance(x, dict) else x for x in batched)
    for lane, seed in enumerate(seeds):
        observations, rewards, infos, truncations = _face_rollout(env, seed, actions)
        np.testing.assert_array_equal(observations, core_obs[lane])
        np.testing.assert_array_equal(rewards.astype(np.float32), core_rewards[lane])
        assert truncations == [False, False, False, True] and core_truncated[lane].tolist() == truncations
        np.testing.assert_array_equal(np.stack([i["arm_iterations"] for i in infos]), np.asarray(core_info["arm_iterations"][lane]))
        for action, info in zip(actions, infos):
            assert info["iterations"] == info["arm_iterations"][action]
            assert float(info["omega"]) == pytest.approx(solver.OMEGA_GRID[action])
            assert float(info["cost_scale"]) == info["arm_iterations"][0]
            assert info["instance_optimal_iterations"] <= info["arm_iterations"].min() + 5
            assert float(info["instance_optimal_omega"]) == pytest.approx(solver.young_omega(float(info["context"])), abs=1e-5)
        np.testing.assert_allclose(rewards, -np.array([i["iterations"] / i["cost_scale"] for i in infos]), rtol=1e-6)
    assert len({float(o) for o in core_obs[:, 0, 0]}) == len(seeds)  # distinct seeds, distinct instances


def test_sor_env_continuous_fixed_scale_previous_cost(sor_continuous_env):
    env = sor_continuous_env
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2,) and obs[1] == 0.0 and env.observation_space.contains(obs)
    obs, reward, _, _, info = env.step(np.array([1.8], np.float32))
    assert reward == pytest.approx(-info["iterations"] / 50.0) and obs[1] == pytest.approx(-reward)
    assert float(info["omega"]) == pytest.approx(1.8) and "arm_iterations" not in info
    _, _, _, _, info = env.step(np.array([2.5], np.float32))
    assert float(info["omega"]) == pytest.approx(1.95)  # clipped to the arm range


def test_heat_env_steps_and_full_information(heat_full_env):
    env = heat_full_env
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0.0]
    for step in range(3):
        obs, reward, terminated, truncated, info = env.step(8)
        assert info["iterations"] == info["arm_iterations"][8] and float(info["cost_scale"]) == max(info["arm_iterations"][0], 1)
        assert info["cg_iterations"] >= 1 and not terminated and truncated == (step == 2)
        assert reward == pytest.approx(-info["iterations"] / float(info["cost_scale"]))
        assert obs[0] == pytest.approx(float(solver.heat_coefficient((step + 1) * solver.HEAT_DT)), rel=1e-5)
    state = env.unwrapped._state
    assert int(state.step) == 3 and state.u.dtype == jnp.float64


@pytest.mark.parametrize("fixture", ["sor_full_env", "sor_continuous_env", "heat_full_env"])
def test_check_env(fixture, request):
    check_env(request.getfixturevalue(fixture), skip_render_check=True)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="action_type"):
        solver.make_sor_bandit_env(action_type="box")
    with pytest.raises(ValueError, match="unknown SORBandit option"):
        solver.make_sor_bandit_env(episode_lenght=5)
    with pytest.raises(ValueError, match="context_distribution"):
        solver.make_sor_bandit_env(context_distribution="medium")
    with pytest.raises(ValueError, match="cost_reference"):
        solver.make_heat_ssor_env(cost_reference="omega2")


def test_registry_ids_when_registered():
    registry = pytest.importorskip("envs.registry")
    if "o2o/SORBandit-v0" not in registry.PROJECT_ENVS:
        pytest.skip("the lead has not registered the solver ids yet")
    env = registry.make("o2o/SORBandit-v0")
    assert env.action_space.n == 20
    core, params = registry.make_jax("o2o/HeatSSOR-v0")
    assert isinstance(core, solver.HeatSSOREnv) and math.isclose(core.dt, solver.HEAT_DT)
