"""Linear-solver parameter selection as contextual bandits (``o2o/SORBandit-v0``, ``o2o/HeatSSOR-v0``).

Every step of these environments is one linear system; the action is the relaxation parameter ω
of the solver (an arm of the 20-value grid ``OMEGA_GRID`` or, optionally, a continuous ω); the cost
is the number of solver iterations, and the reward is minus that cost, scaled to O(1). The context
(what the agent observes before choosing ω) is the matrix parameter that moves the optimal ω.

- **SORBandit** (setup A of "Learning to Relax", Khodak et al., ICLR 2024): i.i.d. systems
  ``(A + c I) x = b`` with A the 5-point Laplacian on a 10×10 grid, c = -0.15 + 0.6·Beta(α, β), b a
  standard normal vector truncated to ``‖b‖ ≤ √n``, solved by SOR from x₀ = 0.
- **HeatSSOR** (setup B): one Crank–Nicolson step of the 2-D heat equation ``u_t = κ(t) Δu + f``
  per env step, solved by SSOR-preconditioned CG warm-started from the previous solution; the
  context is κ at the start of the step. Consecutive systems are coupled (the state holds u), so
  the instances are not i.i.d.

Both matrices are ``diag·I − off·N`` with N the 5-point neighbour operator (zero Dirichlet boundary)
on an m×m grid in natural ordering (index ``k = i·m + j``, j fastest). Grid vectors are held as
(m, m) arrays; every solver iteration is a ``lax.while_loop`` so a solve jits and vmaps (over arms,
instances or seeds). With ``full_information=True`` the env's ``info`` carries the cost of every
arm on the same system (one vmapped call), which gives offline datasets and counterfactual regret.

Precision: the tolerances (1e-8) need float64. The numerics run inside a *scoped*
``jax.enable_x64(True)`` (entered during tracing), so importing this module does not switch the
global x64 flag; observations and rewards leave the env as float32. Calling the core directly,
under ``jit``, ``lax.scan`` or ``vmap`` of a single step, needs nothing more (the gymnasium face does
exactly that). But ``vmap`` applied *around* a ``lax.scan`` (or ``while_loop``) whose body steps the
core re-batches the core's loops after its scope has closed, and fails with a dtype error: trace
such programs inside :func:`float64_scope` (``with float64_scope(): jax.jit(jax.vmap(rollout))(...)``)
or run with ``JAX_ENABLE_X64=1``. Random draws use hand-built float64 samplers (see
:func:`_uniform64`), so a key gives the same instance in every program.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.jax_env import GymnasiumFace, JaxEnv, StepResult

NUM_ARMS = 20
OMEGA_GRID = np.linspace(1.0, 1.95, NUM_ARMS)
"""The 20 relaxation parameters every learner chooses from: 1.00, 1.05, ..., 1.95."""
OMEGA_LOW, OMEGA_HIGH = float(OMEGA_GRID[0]), float(OMEGA_GRID[-1])
DEFAULT_TOL = 1e-8
DEFAULT_MAX_ITERS = 10_000

# Setup A (shifted Laplacians).
LAPLACIAN_GRID = 10
"""Interior points per side of the setup-A grid (n = 100 unknowns)."""
SHIFT_LOW, SHIFT_WIDTH = -0.15, 0.6
CONTEXT_DISTRIBUTIONS: dict[str, tuple[float, float]] = {"high": (0.5, 1.5), "low": (2.0, 6.0)}
"""Beta(α, β) of the diagonal shift: high variance and low variance (spec section 1)."""
SHIFT_CONTEXT_INTERVAL = (-0.15, 0.65)
"""Context interval the reference learners use for setup A (deliberately wider than the support)."""

# Setup B (heat equation).
HEAT_STOP_TIME, HEAT_STEPS = 5.0, 5000
HEAT_DT = HEAT_STOP_TIME / HEAT_STEPS
HEAT_FORCING_AMPLITUDE, HEAT_FORCING_RADIUS, HEAT_INITIAL_RADIUS = 32.0, 0.125, 0.25

CostReference = Literal["omega1", "fixed"]
ActionType = Literal["discrete", "continuous"]


def float64_scope():
    """Scoped ``jax.enable_x64(True)``; every solver entry point runs its numerics inside it."""
    return jax.enable_x64(True)


# --------------------------------------------------------------------------------------------
# 5-point operators and triangular sweeps on an m×m grid


def neighbour_sum(grid: jax.Array) -> jax.Array:
    """Sum of the four N/S/E/W neighbours of every point, zero outside the grid (Dirichlet)."""
    padded = jnp.pad(grid, 1)
    return padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]


def stencil_matvec(grid: jax.Array, diag: jax.Array, off: jax.Array) -> jax.Array:
    """``A x`` for ``A = diag·I − off·N`` (N: neighbour operator)."""
    return diag * grid - off * neighbour_sum(grid)


def _line_inverse(ratio: jax.Array, size: int) -> jax.Array:
    """Inverse of the bidiagonal line operator ``I − ratio·S`` (S: shift by one): ``P[j, k] = ratio^(j−k)``.

    Within one grid line the forward sweep is a first-order recurrence with a constant coefficient,
    so its solution is this lower Toeplitz matrix times the right-hand side: one matvec per line
    instead of ``size`` dependent scalar steps (the sweep over lines stays sequential).
    """
    lag = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
    return jnp.where(lag >= 0, ratio ** jnp.maximum(lag, 0), 0.0)


def lower_sweep(rhs: jax.Array, diag: jax.Array, off: jax.Array, omega: jax.Array) -> jax.Array:
    """Solve ``(D + ω L) z = rhs`` with D = diag(A), L the strict lower triangle of A (natural order).

    Row k couples to k − 1 (same line) and k − m (previous line); lines are swept in order, each
    solved exactly by :func:`_line_inverse`.
    """
    size = rhs.shape[0]
    coupling = omega * off
    line_inverse = _line_inverse(coupling / diag, size)

    def line(previous: jax.Array, rhs_line: jax.Array) -> tuple[jax.Array, jax.Array]:
        solution = line_inverse @ ((rhs_line + coupling * previous) / diag)
        return solution, solution

    _, solution = jax.lax.scan(line, jnp.zeros_like(rhs[0]), rhs)
    return solution


def upper_sweep(rhs: jax.Array, diag: jax.Array, off: jax.Array, omega: jax.Array) -> jax.Array:
    """Solve ``(D + ω L)ᵀ w = rhs`` (backward sweep: last line first, each line right to left)."""
    size = rhs.shape[0]
    coupling = omega * off
    line_inverse_t = _line_inverse(coupling / diag, size).T

    def line(following: jax.Array, rhs_line: jax.Array) -> tuple[jax.Array, jax.Array]:
        solution = line_inverse_t @ ((rhs_line + coupling * following) / diag)
        return solution, solution

    _, solution = jax.lax.scan(line, jnp.zeros_like(rhs[0]), rhs, reverse=True)
    return solution


def ssor_apply_inverse(residual: jax.Array, diag: jax.Array, off: jax.Array, omega: jax.Array) -> jax.Array:
    """``M⁻¹ r`` for the SSOR preconditioner ``M = Xᵀ D⁻¹ X / (ω(2 − ω))``, ``X = D + ω L``.

    As the reference: first ``M1 y = r`` with ``M1 = Xᵀ D⁻¹`` (backward sweep), then ``M2 z = y`` with
    ``M2 = X / (ω(2 − ω))`` (forward sweep).
    """
    y = diag * upper_sweep(residual, diag, off, omega)
    return omega * (2.0 - omega) * lower_sweep(y, diag, off, omega)


def _as_grid(vector: Any, size: int) -> jax.Array:
    return jnp.asarray(vector, jnp.float64).reshape(size, size)


# --------------------------------------------------------------------------------------------
# Solvers (iteration counts)


def sor_grid(
    diag: jax.Array,
    off: jax.Array,
    rhs: jax.Array,
    omega: jax.Array,
    x0: jax.Array,
    tol: float | jax.Array = DEFAULT_TOL,
    max_iters: int | jax.Array = DEFAULT_MAX_ITERS,
) -> tuple[jax.Array, jax.Array]:
    """SOR on grid arrays; returns ``(iterations, x)``. Call inside :func:`float64_scope`.

    ``x ← x + M⁻¹ r`` with ``M = D/ω + L`` (``M⁻¹ r = (D + ωL)⁻¹ ω r``), ``r = b − A x``; stops with cost
    k at the first k with ``‖r‖/‖r₀‖ < tol``, else returns ``max_iters``. A zero initial residual
    costs 0 iterations.
    """
    initial_residual = rhs - stencil_matvec(x0, diag, off)
    initial_norm = jnp.linalg.norm(initial_residual)

    def not_done(carry):
        iteration, _, _, converged = carry
        return jnp.logical_and(~converged, iteration < max_iters)

    def sweep(carry):
        iteration, x, residual, _ = carry
        x = x + lower_sweep(omega * residual, diag, off, omega)
        residual = rhs - stencil_matvec(x, diag, off)
        return iteration + 1, x, residual, jnp.linalg.norm(residual) / initial_norm < tol

    start = (jnp.int32(0), x0, initial_residual, initial_norm == 0.0)
    iterations, x, _, _ = jax.lax.while_loop(not_done, sweep, start)
    return iterations, x


def _pcg_grid(diag, off, rhs, x0, tol, max_iters, precondition) -> tuple[jax.Array, jax.Array]:
    """Preconditioned CG with MATLAB ``pcg`` semantics (tolerance relative to ‖b‖; see module docs).

    Stops at the first k whose recursive residual and true residual ``‖b − A x‖`` are both within
    ``tol·‖b‖``; if only the recursive one is, the true residual replaces it and CG goes on
    (MATLAB's stagnation bookkeeping is not modelled: it never triggers on these systems).
    """
    threshold = tol * jnp.linalg.norm(rhs)
    initial_residual = rhs - stencil_matvec(x0, diag, off)

    def not_done(carry):
        iteration, _, _, _, _, converged = carry
        return jnp.logical_and(~converged, iteration < max_iters)

    def step(carry):
        iteration, x, residual, direction, rho_previous, _ = carry
        preconditioned = precondition(residual)
        rho = jnp.vdot(residual, preconditioned)
        direction = jnp.where(iteration == 0, preconditioned, preconditioned + (rho / rho_previous) * direction)
        image = stencil_matvec(direction, diag, off)
        step_size = rho / jnp.vdot(direction, image)
        x = x + step_size * direction
        residual = residual - step_size * image
        recursive_ok = jnp.linalg.norm(residual) <= threshold
        true_residual = rhs - stencil_matvec(x, diag, off)
        true_ok = jnp.linalg.norm(true_residual) <= threshold
        residual = jnp.where(recursive_ok & ~true_ok, true_residual, residual)
        return iteration + 1, x, residual, direction, rho, recursive_ok & true_ok

    converged = jnp.logical_or(jnp.linalg.norm(initial_residual) <= threshold, threshold == 0.0)
    start = (jnp.int32(0), x0, initial_residual, jnp.zeros_like(x0), jnp.ones((), x0.dtype), converged)
    iterations, x, _, _, _, _ = jax.lax.while_loop(not_done, step, start)
    return iterations, jnp.where(threshold == 0.0, jnp.zeros_like(x), x)


def ssor_pcg_grid(diag, off, rhs, x0, omega, tol=DEFAULT_TOL, max_iters=DEFAULT_MAX_ITERS) -> tuple[jax.Array, jax.Array]:
    """SSOR-preconditioned CG on grid arrays; returns ``(iterations, x)``. Call inside :func:`float64_scope`."""
    return _pcg_grid(diag, off, rhs, x0, tol, max_iters, lambda r: ssor_apply_inverse(r, diag, off, omega))


def cg_grid(diag, off, rhs, x0, tol=DEFAULT_TOL, max_iters=DEFAULT_MAX_ITERS) -> tuple[jax.Array, jax.Array]:
    """Unpreconditioned CG (same semantics as :func:`ssor_pcg_grid`); returns ``(iterations, x)``."""
    return _pcg_grid(diag, off, rhs, x0, tol, max_iters, lambda r: r)


# --------------------------------------------------------------------------------------------
# Setup A: shifted Laplacians


def laplacian_eigen_bounds(size: int = LAPLACIAN_GRID) -> tuple[float, float]:
    """``(λ_min, λ_max)`` of the 5-point Laplacian (diagonal 4) on a size×size grid."""
    cosine = math.cos(math.pi / (size + 1))
    return 4.0 - 4.0 * cosine, 4.0 + 4.0 * cosine


def young_omega(shift: Any, size: int = LAPLACIAN_GRID) -> Any:
    """Young's optimal SOR parameter for ``A + shift·I``: ``1 + (β / (1 + √(1 − β²)))²``.

    ``β = ρ(I − D⁻¹A) = 4 cos(π/(size+1)) / (4 + shift)`` (the matrix is consistently ordered).
    Works on floats and arrays (numpy or jax).
    """
    beta = 4.0 * math.cos(math.pi / (size + 1)) / (4.0 + shift)
    return 1.0 + (beta / (1.0 + (1.0 - beta**2) ** 0.5)) ** 2


def sor_solve(
    shift: Any,
    rhs: Any,
    omega: Any,
    x0: Any | None = None,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> tuple[jax.Array, jax.Array]:
    """SOR iterations on ``(A + shift·I) x = rhs`` (setup A); returns ``(iterations, x)`` (x flat).

    ``rhs`` is a flat vector of length size² (natural ordering); jittable and vmappable.
    """
    with float64_scope():
        size = math.isqrt(int(np.shape(rhs)[-1]))
        rhs_grid = _as_grid(rhs, size)
        start = jnp.zeros_like(rhs_grid) if x0 is None else _as_grid(x0, size)
        shift = jnp.asarray(shift, jnp.float64)
        iterations, x = sor_grid(4.0 + shift, jnp.float64(1.0), rhs_grid, jnp.asarray(omega, jnp.float64), start, tol, max_iters)
        return iterations, x.reshape(-1)


def sor_arm_costs(shift: Any, rhs: Any, omegas: Any = OMEGA_GRID, tol: float = DEFAULT_TOL, max_iters: int = DEFAULT_MAX_ITERS) -> jax.Array:
    """SOR iteration counts of one instance for every ω in ``omegas`` (vmapped); int32 (len(omegas),)."""
    with float64_scope():
        omegas = jnp.asarray(omegas, jnp.float64)
        return jax.vmap(lambda omega: sor_solve(shift, rhs, omega, tol=tol, max_iters=max_iters)[0])(omegas)


def _sor_iterations_batch(shifts: jax.Array, rhs: jax.Array, omegas: jax.Array, tol: float, max_iters: int) -> jax.Array:
    with float64_scope():
        return jax.vmap(lambda s, b, w: sor_solve(s, b, w, tol=tol, max_iters=max_iters)[0])(shifts, rhs, omegas)


_sor_iterations_batch_jit = jax.jit(_sor_iterations_batch, static_argnames=("tol", "max_iters"))


def predicted_sor_rate(shift: Any, omega: Any, size: int = LAPLACIAN_GRID) -> np.ndarray:
    """Asymptotic SOR convergence factor (Young's theory) for ``A + shift·I``: used to group solves."""
    beta = 4.0 * np.cos(np.pi / (size + 1)) / (4.0 + np.asarray(shift, np.float64))
    omega = np.asarray(omega, np.float64)
    discriminant = np.maximum(omega**2 * beta**2 - 4.0 * (omega - 1.0), 0.0)
    below_optimum = ((omega * beta + np.sqrt(discriminant)) / 2.0) ** 2
    return np.where(omega >= young_omega(np.asarray(shift, np.float64), size), np.abs(omega - 1.0), below_optimum)


def sor_iterations_many(
    shifts: Any,
    rhs: Any,
    omegas: Any,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    chunk_size: int = 1024,
) -> np.ndarray:
    """SOR iteration counts for many independent ``(shift, rhs, ω)`` triples (host driver).

    A vmapped ``while_loop`` runs until its slowest member converges, so the triples are sorted by
    their predicted convergence factor and solved in chunks of similar cost (one compiled program,
    fixed chunk shape). Returns int64 counts in the input order.
    """
    shifts = np.asarray(shifts, np.float64)
    rhs = np.asarray(rhs, np.float64)
    omegas = np.broadcast_to(np.asarray(omegas, np.float64), shifts.shape)
    order = np.argsort(predicted_sor_rate(shifts, omegas, math.isqrt(rhs.shape[-1])), kind="stable")
    counts = np.empty(len(shifts), np.int64)
    for start in range(0, len(order), chunk_size):
        index = order[start : start + chunk_size]
        padded = np.concatenate([index, np.full(chunk_size - len(index), index[0])])
        with float64_scope():
            chunk = _sor_iterations_batch_jit(
                jnp.asarray(shifts[padded]), jnp.asarray(rhs[padded]), jnp.asarray(omegas[padded]), tol=tol, max_iters=max_iters
            )
        counts[index] = np.asarray(chunk)[: len(index)]
    return counts


def sor_cost_table(shifts: Any, rhs: Any, omegas: Any = OMEGA_GRID, **kwargs: Any) -> np.ndarray:
    """Full-information cost table: SOR iterations of every instance (rows) at every ω (columns)."""
    shifts = np.asarray(shifts, np.float64)
    omegas = np.asarray(omegas, np.float64)
    rows, columns = np.meshgrid(np.arange(len(shifts)), np.arange(len(omegas)), indexing="ij")
    counts = sor_iterations_many(shifts[rows.ravel()], np.asarray(rhs)[rows.ravel()], omegas[columns.ravel()], **kwargs)
    return counts.reshape(len(shifts), len(omegas))


def _uniform64(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float64 uniforms on the open interval (0, 1) built from two 32-bit random words.

    Hand-written because jax's own float64 samplers (uniform, normal, beta) lower their 64-bit
    parts lazily, after the scoped x64 block has closed, and then fail with dtype errors; float32
    draws would work but their rounding changes with the surrounding program (fusion), so the same
    key would not give the same instance in the gymnasium face and in a vmapped rollout.
    Call inside :func:`float64_scope`.
    """
    words = jax.random.bits(key, (2, *shape), jnp.uint32).astype(jnp.uint64)
    mantissa = (words[0] << 21) ^ (words[1] >> 11)  # 53 random bits
    return (mantissa.astype(jnp.float64) + 0.5) * 2.0**-53


def _normal64(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float64 standard normals (Box–Muller on :func:`_uniform64`). Call inside :func:`float64_scope`."""
    uniforms = _uniform64(key, (2, *shape))
    return jnp.sqrt(-2.0 * jnp.log(uniforms[0])) * jnp.cos(2.0 * jnp.pi * uniforms[1])


def _gamma64(key: jax.Array, shape_parameter: jax.Array) -> jax.Array:
    """One Gamma(α, 1) draw in float64: Marsaglia–Tsang squeeze-rejection for α + 1 (α < 1) or α,
    with the boost ``G(α) = G(α + 1)·U^(1/α)`` below 1 (see :func:`_uniform64` for why hand-written)."""
    boosted = shape_parameter < 1.0
    alpha = jnp.where(boosted, shape_parameter + 1.0, shape_parameter)
    d = alpha - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)

    def propose(carry):
        key, _, _ = carry
        key, normal_key, uniform_key = jax.random.split(key, 3)
        x = _normal64(normal_key, ())
        v = (1.0 + c * x) ** 3
        log_u = jnp.log(_uniform64(uniform_key, ()))
        accept = (v > 0.0) & (log_u < 0.5 * x**2 + d - d * v + d * jnp.log(jnp.where(v > 0.0, v, 1.0)))
        return key, d * v, accept

    key, boost_key = jax.random.split(key)
    _, draw, _ = jax.lax.while_loop(lambda carry: ~carry[2], propose, (key, jnp.float64(0.0), jnp.bool_(False)))
    boost = _uniform64(boost_key, ()) ** (1.0 / shape_parameter)
    return jnp.where(boosted, draw * boost, draw)


def sample_beta(key: jax.Array, shape: tuple[int, ...], beta_a: Any, beta_b: Any) -> jax.Array:
    """Beta(a, b) draws in float64 as ``X/(X + Y)`` with X ~ Gamma(a), Y ~ Gamma(b)."""
    with float64_scope():
        beta_a, beta_b = jnp.asarray(beta_a, jnp.float64), jnp.asarray(beta_b, jnp.float64)
        count = math.prod(shape)

        def one(key):
            first, second = jax.vmap(_gamma64)(jax.random.split(key), jnp.stack([beta_a, beta_b]))
            return first / (first + second)

        return jax.vmap(one)(jax.random.split(key, count)).reshape(shape)


def sample_shifts(key: jax.Array, shape: tuple[int, ...], beta_a: Any, beta_b: Any, low: Any = SHIFT_LOW, width: Any = SHIFT_WIDTH) -> jax.Array:
    """Diagonal shifts ``low + width·Beta(a, b)`` (float64)."""
    with float64_scope():
        low, width = jnp.asarray(low, jnp.float64), jnp.asarray(width, jnp.float64)
        return low + width * sample_beta(key, shape, beta_a, beta_b)


def sample_truncated_normal(key: jax.Array, size: int, radius: Any) -> jax.Array:
    """A standard normal vector redrawn until ``‖b‖₂ ≤ radius`` (rejection sampling, float64)."""
    with float64_scope():

        def draw(carry):
            key, _ = carry
            key, subkey = jax.random.split(key)
            return key, _normal64(subkey, (size,))

        start = draw((key, jnp.zeros(size, jnp.float64)))
        radius = jnp.asarray(radius, jnp.float64)
        return jax.lax.while_loop(lambda carry: jnp.linalg.norm(carry[1]) > radius, draw, start)[1]


def numpy_instances(seed: int, count: int, beta_a: float, beta_b: float, size: int = LAPLACIAN_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The reference instance sequence (spec 7.2): numpy ``default_rng(seed)``, all shifts first,
    then the truncated-normal right-hand sides (rejection to ``‖b‖ ≤ √n``)."""
    rng = np.random.default_rng(seed)
    shifts = SHIFT_LOW + SHIFT_WIDTH * rng.beta(beta_a, beta_b, count)
    n = size * size
    rhs = np.empty((count, n))
    for index in range(count):
        vector = rng.standard_normal(n)
        while np.linalg.norm(vector) > math.sqrt(n):
            vector = rng.standard_normal(n)
        rhs[index] = vector
    return shifts, rhs


# --------------------------------------------------------------------------------------------
# Setup B: 2-D heat equation, Crank–Nicolson


def heat_coefficient(time: Any) -> Any:
    """Diffusion coefficient ``κ(t) = max(0.1 sin 2πt, −10 sin 2πt)`` ∈ [0, 10] (period 1)."""
    wave = jnp.sin(2.0 * jnp.pi * time)
    return jnp.maximum(0.1 * wave, -10.0 * wave)


def heat_context_interval(steps: int = HEAT_STEPS, stop_time: float = HEAT_STOP_TIME) -> tuple[float, float]:
    """``[κ_min, κ_max]`` over ``linspace(0, stop_time, steps)`` (the learners' context interval)."""
    times = np.linspace(0.0, stop_time, steps)
    wave = np.sin(2.0 * np.pi * times)
    values = np.maximum(0.1 * wave, -10.0 * wave)
    return float(values.min()), float(values.max())


def bump(points: jax.Array, centre: Any, radius: Any) -> jax.Array:
    """Smooth bump ``exp(1 − 1/(1 − min(1, ‖x − c‖²/r²)))``: 1 at the centre, 0 outside radius r."""
    distance_sq = jnp.sum((points - jnp.asarray(centre)) ** 2, axis=-1) / radius**2
    return jnp.exp(1.0 - 1.0 / (1.0 - jnp.minimum(1.0, distance_sq)))


def heat_grid_points(nx: int) -> jax.Array:
    """Interior grid points ``(i·dx, j·dx)``, i, j = 1..nx−1, as an (nx−1, nx−1, 2) float64 array."""
    with float64_scope():
        axis = jnp.arange(1, nx, dtype=jnp.float64) / nx
        first, second = jnp.meshgrid(axis, axis, indexing="ij")
        return jnp.stack([first, second], axis=-1)


def heat_initial_condition(nx: int) -> jax.Array:
    """``u₀ = bump(x; (0.5, 0.5), 0.25)`` on the interior grid (float64, (nx−1, nx−1))."""
    with float64_scope():
        return bump(heat_grid_points(nx), (0.5, 0.5), HEAT_INITIAL_RADIUS)


def heat_forcing(time: Any, points: jax.Array) -> jax.Array:
    """``f(t, x) = 32·bump(x; (0.5 + cos(16πt)/4, 0.5 + sin(16πt)/4), 0.125)`` (a bump circling the centre)."""
    centre = jnp.stack([0.5 + jnp.cos(16.0 * jnp.pi * time) / 4.0, 0.5 + jnp.sin(16.0 * jnp.pi * time) / 4.0])
    return HEAT_FORCING_AMPLITUDE * bump(points, centre, HEAT_FORCING_RADIUS)


def crank_nicolson_system(u: jax.Array, time: Any, dt: Any, coefficient: Any | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The system of one Crank–Nicolson step from ``time``: returns ``(diag, off, rhs)``.

    With h = t + dt/2 and L the 5-point Laplacian / dx²: ``A = I − ½κ(h)·dt·L`` (so
    ``diag = 1 + 2κ dt/dx²``, ``off = ½κ dt/dx²``) and ``b = (I + ½κ(h)·dt·L) u + dt·f(h, x)``.
    ``coefficient`` overrides κ(h) (used to pin single systems). Call inside :func:`float64_scope`.
    """
    nx = u.shape[0] + 1
    half_step = time + 0.5 * dt
    kappa = heat_coefficient(half_step) if coefficient is None else jnp.asarray(coefficient, jnp.float64)
    off = 0.5 * kappa * dt * nx**2
    diag = 1.0 + 4.0 * off
    rhs = (1.0 - 4.0 * off) * u + off * neighbour_sum(u) + dt * heat_forcing(half_step, heat_grid_points(nx))
    return diag, off, rhs


def heat_step(
    u: jax.Array,
    time: Any,
    omega: Any | None,
    dt: float = HEAT_DT,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    coefficient: Any | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advance the heat simulation by one step, warm-started from ``u``; returns ``(iterations, u_new)``.

    ``omega=None`` solves with unpreconditioned CG, otherwise SSOR-PCG with that ω.
    """
    with float64_scope():
        u = jnp.asarray(u, jnp.float64)
        diag, off, rhs = crank_nicolson_system(u, jnp.asarray(time, jnp.float64), dt, coefficient)
        if omega is None:
            return cg_grid(diag, off, rhs, u, tol, max_iters)
        return ssor_pcg_grid(diag, off, rhs, u, jnp.asarray(omega, jnp.float64), tol, max_iters)


def heat_arm_costs(u: jax.Array, time: Any, omegas: Any = OMEGA_GRID, dt: float = HEAT_DT, tol: float = DEFAULT_TOL, max_iters: int = DEFAULT_MAX_ITERS) -> jax.Array:
    """SSOR-PCG iteration counts of one heat step for every ω in ``omegas`` (vmapped, same warm start)."""
    with float64_scope():
        omegas = jnp.asarray(omegas, jnp.float64)
        return jax.vmap(lambda omega: heat_step(u, time, omega, dt, tol, max_iters)[0])(omegas)


def heat_simulation_costs(
    nx: int,
    omega: Any | None,
    steps: int = HEAT_STEPS,
    dt: float = HEAT_DT,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> jax.Array:
    """Per-step iteration counts of a whole simulation at a fixed ω (``None``: CG), each step
    warm-started from the method's own previous solution (one ``lax.scan``)."""
    with float64_scope():

        def advance(u, index):
            iterations, u = heat_step(u, index * dt, omega, dt, tol, max_iters)
            return u, iterations

        _, counts = jax.lax.scan(advance, heat_initial_condition(nx), jnp.arange(steps, dtype=jnp.float64))
        return counts


# --------------------------------------------------------------------------------------------
# Environment cores


def _param64(value: Any) -> jax.Array:
    """A parameter leaf at float32 precision, widened to float64.

    Parameter leaves arrive as float32 when a program is traced with x64 off (the gymnasium face)
    and as float64 when traced inside an x64 scope; rounding them to float32 first makes both give
    the same instances for the same key.
    """
    return jnp.asarray(value).astype(jnp.float32).astype(jnp.float64)


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class _SolverBanditCore(JaxEnv):
    """Shared action/observation/reward plumbing of the two solver bandits."""

    def __init__(
        self,
        action_type: ActionType,
        full_information: bool,
        cost_reference: CostReference,
        observe_previous_cost: bool,
        tol: float,
        max_iters: int,
    ) -> None:
        _check_choice("action_type", action_type, ("discrete", "continuous"))
        _check_choice("cost_reference", cost_reference, ("omega1", "fixed"))
        if not (tol > 0.0 and max_iters >= 1):
            raise ValueError(f"tol must be > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
        self.action_type = action_type
        self.full_information = bool(full_information)
        self.cost_reference = cost_reference
        self.observe_previous_cost = bool(observe_previous_cost)
        self.tol = float(tol)
        self.max_iters = int(max_iters)

    def trace_scope(self) -> contextlib.AbstractContextManager:
        """:func:`float64_scope` (see :meth:`JaxEnv.trace_scope`)."""
        return float64_scope()

    def action_to_omega(self, action: jax.Array) -> jax.Array:
        """ω of an action: the arm's grid value (Discrete) or the clipped continuous value (Box)."""
        with float64_scope():
            if self.action_type == "discrete":
                return jnp.asarray(OMEGA_GRID, jnp.float64)[jnp.asarray(action, jnp.int32).reshape(())]
            return jnp.clip(jnp.asarray(action, jnp.float64).reshape(-1)[0], OMEGA_LOW, OMEGA_HIGH)

    def _observation(self, context: jax.Array, previous_cost: jax.Array) -> jax.Array:
        parts = [context.astype(jnp.float32)]
        if self.observe_previous_cost:
            parts.append(previous_cost.astype(jnp.float32))
        return jnp.stack(parts)

    def _cost_scale(self, reference_cost: jax.Array, params: Any) -> jax.Array:
        """k_ref (the ω = 1 cost, at least 1) or the fixed scale; ``reference_cost`` is unused then."""
        if self.cost_reference == "omega1":
            return jnp.maximum(reference_cost, 1).astype(jnp.float64)
        return _param64(params.fixed_cost_scale)

    def observation_space(self, params: Any) -> gym.spaces.Box:
        """Box: the context (and, if observed, the previous scaled cost, at most ``max_iters`` / scale)."""
        low, high = map(list, self.context_bounds(params))
        if self.observe_previous_cost:
            low.append(0.0)
            high.append(float(self.max_iters) / (1.0 if self.cost_reference == "omega1" else float(params.fixed_cost_scale)))
        return gym.spaces.Box(np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32)

    def context_bounds(self, params: Any) -> tuple[tuple[float], tuple[float]]:
        """``((low,), (high,))`` of the observed context."""
        raise NotImplementedError

    def action_space(self, params: Any) -> gym.spaces.Space:
        """``Discrete(20)`` over ``OMEGA_GRID`` or ``Box(1.0, 1.95, (1,))``."""
        if self.action_type == "discrete":
            return gym.spaces.Discrete(NUM_ARMS)
        return gym.spaces.Box(OMEGA_LOW, OMEGA_HIGH, (1,), np.float32)


class SORBanditParams(struct.PyTreeNode):
    """Instance distribution and episode settings of :class:`SORBanditEnv` (every field may be traced)."""

    beta_a: float = CONTEXT_DISTRIBUTIONS["high"][0]
    """α of the Beta law of the shift (0.5: high variance; 2.0: low variance)."""
    beta_b: float = CONTEXT_DISTRIBUTIONS["high"][1]
    """β of the Beta law of the shift (1.5: high variance; 6.0: low variance)."""
    shift_low: float = SHIFT_LOW
    """Lowest diagonal shift c."""
    shift_width: float = SHIFT_WIDTH
    """Width of the shift support: c ∈ [shift_low, shift_low + shift_width]."""
    rhs_radius: float = float(LAPLACIAN_GRID)
    """Right-hand sides are standard normal, redrawn until ‖b‖₂ ≤ rhs_radius (√n by default)."""
    episode_length: int = 1000
    """Instances per episode (5,000 for paper parity); the episode is truncated after it."""
    fixed_cost_scale: float = 100.0
    """Reward = −iterations / fixed_cost_scale when ``cost_reference="fixed"``."""


class SORBanditState(struct.PyTreeNode):
    """The instance waiting to be solved, the step counter and the last scaled cost."""

    step: jax.Array
    shift: jax.Array
    rhs: jax.Array
    previous_cost: jax.Array


class SORBanditEnv(_SolverBanditCore):
    """Functional core of ``o2o/SORBandit-v0``: choose SOR's ω for i.i.d. shifted Laplacian systems.

    Observation: the shift c of the next system (float32 Box), optionally with the previous scaled
    cost. Action: an arm of ``OMEGA_GRID`` (Discrete(20)) or ω ∈ [1, 1.95] (Box). Reward:
    ``−k/k_ref`` with k the SOR iterations and ``k_ref`` the iterations at ω = 1 on the same system
    (``cost_reference="omega1"``) or ``params.fixed_cost_scale`` (``"fixed"``, so that the return
    is proportional to total iterations). Never terminates; truncated after ``episode_length``.
    ``info``: ``iterations``, ``omega``, ``context``, ``cost_scale``, and with
    ``full_information=True`` also ``arm_iterations`` (20,), ``instance_optimal_omega`` (Young) and
    ``instance_optimal_iterations``.
    """

    def __init__(
        self,
        grid_size: int = LAPLACIAN_GRID,
        action_type: ActionType = "discrete",
        full_information: bool = False,
        cost_reference: CostReference = "omega1",
        observe_previous_cost: bool = False,
        tol: float = DEFAULT_TOL,
        max_iters: int = DEFAULT_MAX_ITERS,
    ) -> None:
        super().__init__(action_type, full_information, cost_reference, observe_previous_cost, tol, max_iters)
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}")
        self.grid_size = int(grid_size)

    def context_bounds(self, params: SORBanditParams) -> tuple[tuple[float], tuple[float]]:
        """The support of the shift: ``[shift_low, shift_low + shift_width]``."""
        low = float(np.float32(params.shift_low))
        return (low,), (float(np.float32(params.shift_low) + np.float32(params.shift_width)),)

    def default_params(self) -> SORBanditParams:
        """High-variance shifts, ‖b‖ ≤ √n, 1,000 instances per episode."""
        return SORBanditParams(rhs_radius=float(self.grid_size))

    def _draw_instance(self, key: jax.Array, params: SORBanditParams) -> tuple[jax.Array, jax.Array]:
        key_shift, key_rhs = jax.random.split(key)
        beta_a, beta_b, low, width, radius = (
            _param64(value) for value in (params.beta_a, params.beta_b, params.shift_low, params.shift_width, params.rhs_radius)
        )
        shift = sample_shifts(key_shift, (), beta_a, beta_b, low, width)
        return shift, sample_truncated_normal(key_rhs, self.grid_size**2, radius)

    def reset(self, key: jax.Array, params: SORBanditParams) -> tuple[jax.Array, SORBanditState]:
        """Draw the first system; the observation is its shift."""
        with float64_scope():
            shift, rhs = self._draw_instance(key, params)
            state = SORBanditState(jnp.int32(0), shift, rhs, jnp.float32(0.0))
            return self._observation(shift, state.previous_cost), state

    def step(self, key: jax.Array, state: SORBanditState, action: jax.Array, params: SORBanditParams) -> StepResult:
        """Solve the pending system with the chosen ω, then draw the next one."""
        with float64_scope():
            omega = self.action_to_omega(action)
            iterations, _ = sor_solve(state.shift, state.rhs, omega, tol=self.tol, max_iters=self.max_iters)
            info: dict[str, jax.Array] = {"omega": omega.astype(jnp.float32), "context": state.shift.astype(jnp.float32)}
            reference = None
            if self.full_information:
                arm_iterations = sor_arm_costs(state.shift, state.rhs, tol=self.tol, max_iters=self.max_iters)
                optimal_omega = young_omega(state.shift, self.grid_size)
                info["arm_iterations"] = arm_iterations
                info["instance_optimal_omega"] = optimal_omega.astype(jnp.float32)
                info["instance_optimal_iterations"] = sor_solve(state.shift, state.rhs, optimal_omega, tol=self.tol, max_iters=self.max_iters)[0]
                reference = arm_iterations[0]
            if self.cost_reference == "omega1" and reference is None:
                reference = sor_solve(state.shift, state.rhs, OMEGA_LOW, tol=self.tol, max_iters=self.max_iters)[0]
            cost_scale = self._cost_scale(reference, params)
            scaled_cost = (iterations / cost_scale).astype(jnp.float32)
            info["iterations"] = iterations
            info["cost_scale"] = cost_scale.astype(jnp.float32)
            shift, rhs = self._draw_instance(key, params)
            next_state = SORBanditState(state.step + 1, shift, rhs, scaled_cost)
            return StepResult(
                obs=self._observation(shift, scaled_cost),
                state=next_state,
                reward=-scaled_cost,
                terminated=jnp.bool_(False),
                truncated=next_state.step >= params.episode_length,
                info=info,
            )


class HeatSSORParams(struct.PyTreeNode):
    """Episode settings of :class:`HeatSSOREnv`."""

    episode_length: int = 1000
    """Simulation steps per episode (one κ period is 1,000 steps; 5,000 for paper parity)."""
    fixed_cost_scale: float = 10.0
    """Reward = −iterations / fixed_cost_scale when ``cost_reference="fixed"``."""


class HeatSSORState(struct.PyTreeNode):
    """Step index (time = step·dt), the current temperature field and the last scaled cost."""

    step: jax.Array
    u: jax.Array
    previous_cost: jax.Array


class HeatSSOREnv(_SolverBanditCore):
    """Functional core of ``o2o/HeatSSOR-v0``: choose ω of SSOR-PCG for each Crank–Nicolson step.

    Observation: κ(t) at the start of the step (Box [0, 10]; the reference learners use the
    interval :func:`heat_context_interval`), optionally with the previous scaled cost. The chosen
    ω's solution advances the simulation (warm start of the next step). Reward ``−k/k_ref`` as in
    :class:`SORBanditEnv` (``k_ref``: SSOR-PCG at ω = 1 from the same warm start). ``info``:
    ``iterations``, ``omega``, ``context``, ``time``, ``cost_scale``; with ``full_information=True``
    also ``arm_iterations`` (20,) and ``cg_iterations`` (unpreconditioned CG), all from the same
    warm start. Never terminates; truncated after ``episode_length`` steps.
    """

    def __init__(
        self,
        nx: int = 25,
        action_type: ActionType = "discrete",
        full_information: bool = False,
        cost_reference: CostReference = "omega1",
        observe_previous_cost: bool = False,
        tol: float = DEFAULT_TOL,
        max_iters: int = DEFAULT_MAX_ITERS,
        dt: float = HEAT_DT,
    ) -> None:
        super().__init__(action_type, full_information, cost_reference, observe_previous_cost, tol, max_iters)
        if nx < 3 or dt <= 0.0:
            raise ValueError(f"nx must be >= 3 and dt > 0, got nx={nx}, dt={dt}")
        self.nx = int(nx)
        self.dt = float(dt)

    def context_bounds(self, params: HeatSSORParams) -> tuple[tuple[float], tuple[float]]:
        """The range of κ: [0, 10]."""
        return (0.0,), (10.0,)

    def default_params(self) -> HeatSSORParams:
        """1,000 steps per episode."""
        return HeatSSORParams()

    def reset(self, key: jax.Array, params: HeatSSORParams) -> tuple[jax.Array, HeatSSORState]:
        """Start from ``u₀`` at t = 0 (deterministic)."""
        with float64_scope():
            state = HeatSSORState(jnp.int32(0), heat_initial_condition(self.nx), jnp.float32(0.0))
            return self._observation(heat_coefficient(jnp.float64(0.0)), state.previous_cost), state

    def step(self, key: jax.Array, state: HeatSSORState, action: jax.Array, params: HeatSSORParams) -> StepResult:
        """Solve this step's system with the chosen ω (warm start u) and advance the simulation."""
        with float64_scope():
            omega = self.action_to_omega(action)
            time = state.step.astype(jnp.float64) * self.dt
            # One vmapped solve for every ω this step needs: [chosen, (20 arms) or (ω = 1)].
            omegas = [omega[None]]
            if self.full_information:
                omegas.append(jnp.asarray(OMEGA_GRID, jnp.float64))
            elif self.cost_reference == "omega1":
                omegas.append(jnp.ones(1, jnp.float64))
            counts, solutions = jax.vmap(lambda w: heat_step(state.u, time, w, self.dt, self.tol, self.max_iters))(jnp.concatenate(omegas))
            iterations, u_next = counts[0], solutions[0]
            info: dict[str, jax.Array] = {
                "omega": omega.astype(jnp.float32),
                "context": heat_coefficient(time).astype(jnp.float32),
                "time": time.astype(jnp.float32),
            }
            if self.full_information:
                info["arm_iterations"] = counts[1:]
                info["cg_iterations"] = heat_step(state.u, time, None, self.dt, self.tol, self.max_iters)[0]
            cost_scale = self._cost_scale(counts[1] if len(omegas) > 1 else counts[0], params)
            scaled_cost = (iterations / cost_scale).astype(jnp.float32)
            info["iterations"] = iterations
            info["cost_scale"] = cost_scale.astype(jnp.float32)
            next_state = HeatSSORState(state.step + 1, u_next, scaled_cost)
            next_context = heat_coefficient(next_state.step.astype(jnp.float64) * self.dt)
            return StepResult(
                obs=self._observation(next_context, scaled_cost),
                state=next_state,
                reward=-scaled_cost,
                terminated=jnp.bool_(False),
                truncated=next_state.step >= params.episode_length,
                info=info,
            )


def _split_overrides(params_type: type, overrides: dict[str, Any], env_name: str) -> dict[str, Any]:
    known = set(params_type.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {env_name} option(s) {unknown}; parameter fields are {sorted(known)}")
    return overrides


def make_sor_bandit_env(
    *,
    context_distribution: Literal["high", "low"] = "high",
    grid_size: int = LAPLACIAN_GRID,
    action_type: ActionType = "discrete",
    full_information: bool = False,
    cost_reference: CostReference = "omega1",
    observe_previous_cost: bool = False,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    **param_overrides: Any,
) -> gym.Env:
    """Gymnasium face of :class:`SORBanditEnv` (``o2o/SORBandit-v0``).

    ``context_distribution`` picks the Beta law of the shift ("high": Beta(0.5, 1.5), "low":
    Beta(2, 6)); ``param_overrides`` set :class:`SORBanditParams` fields (e.g. ``episode_length=5000``).
    """
    _check_choice("context_distribution", context_distribution, tuple(CONTEXT_DISTRIBUTIONS))
    core = SORBanditEnv(grid_size, action_type, full_information, cost_reference, observe_previous_cost, tol, max_iters)
    beta_a, beta_b = CONTEXT_DISTRIBUTIONS[context_distribution]
    overrides = {"beta_a": beta_a, "beta_b": beta_b, **_split_overrides(SORBanditParams, param_overrides, "SORBandit")}
    return GymnasiumFace(core, core.default_params().replace(**overrides))


def make_heat_ssor_env(
    *,
    nx: int = 25,
    action_type: ActionType = "discrete",
    full_information: bool = False,
    cost_reference: CostReference = "omega1",
    observe_previous_cost: bool = False,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    dt: float = HEAT_DT,
    **param_overrides: Any,
) -> gym.Env:
    """Gymnasium face of :class:`HeatSSOREnv` (``o2o/HeatSSOR-v0``); ``param_overrides`` set
    :class:`HeatSSORParams` fields (e.g. ``episode_length=5000``)."""
    core = HeatSSOREnv(nx, action_type, full_information, cost_reference, observe_previous_cost, tol, max_iters, dt)
    overrides = _split_overrides(HeatSSORParams, param_overrides, "HeatSSOR")
    return GymnasiumFace(core, core.default_params().replace(**overrides))
