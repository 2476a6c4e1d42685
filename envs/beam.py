"""Beam orbit correction in one superconducting cryomodule (``o2o/OrbitCorrection-v0``).

A linear-optics surrogate of the CAFe II cryomodule used by trend-based SAC (TBSAC): five identical
0.64 m cells, each a drift, a solenoid split in two halves with an x/y dipole corrector between
them, a drift through the cavity and a beam-position monitor (BPM). The beam centroid
``z = (x, x', y, y')`` (mm, mrad) is tracked through the cells; the ten BPM readings (x1, y1, x2,
y2, ...) are linear in the ten corrector settings, ``b(theta) = R theta + b_err``.

Every reset resamples the misalignment errors (solenoid offsets and injection offset) and, when the
parameters ask for it, the domain randomisation (a common solenoid scale, per-corrector gains and
Gaussian BPM noise). The observation is the TBSAC trend state
``[delta b_{t-1}, delta b_t, b_t]``; the reward is ``-RMS(b_t) + 0.4 D_t`` plus a success bonus; an
episode *terminates* when the measured RMS falls below 0.5 mm and is *truncated* at 50 steps.

The module also provides the SVD least-squares corrector used as expert
(:func:`svd_expert_action`, :func:`noisy_svd_expert_action`) and :func:`make_orbit_env`, the
gymnasium factory.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import scipy.constants
from flax import struct

from envs.jax_env import GymnasiumFace, JaxEnv, StepResult

NUM_CELLS = 5
NUM_READINGS = 2 * NUM_CELLS  # BPM readings (x, y per BPM) and correctors (x, y per solenoid)
OBSERVATION_SIZE = 3 * NUM_READINGS
OBSERVATION_BOUND = 10.0  # declared Box bound (mm), as in TBSAC; not enforced on the readings

NOMINAL_SOLENOID_SETTINGS = (0.81, -0.81, -0.83, -0.89, -0.75)

# 40Ar12+ at 1.356 MeV/u (CAFe II).
ARGON_REST_ENERGY_MEV = 37218.59
ARGON_MASS_NUMBER = 40
ARGON_CHARGE_STATE = 12
ARGON_KINETIC_ENERGY_PER_NUCLEON_MEV = 1.356


def magnetic_rigidity(
    rest_energy_mev: float = ARGON_REST_ENERGY_MEV,
    kinetic_energy_per_nucleon_mev: float = ARGON_KINETIC_ENERGY_PER_NUCLEON_MEV,
    mass_number: int = ARGON_MASS_NUMBER,
    charge_state: int = ARGON_CHARGE_STATE,
) -> float:
    """Magnetic rigidity B·rho (T·m) of an ion: ``p / (c Z)`` with p in MeV/c and c in 1e6 m/s."""
    gamma = 1.0 + kinetic_energy_per_nucleon_mev * mass_number / rest_energy_mev
    momentum_mev = rest_energy_mev * float(np.sqrt(gamma**2 - 1.0))
    return momentum_mev / (scipy.constants.c * 1e-6 * charge_state)


class OrbitParams(struct.PyTreeNode):
    """Lattice, error model, randomisation and task settings (a pytree: every field may be traced).

    The defaults are the nominal lattice without domain randomisation; :func:`randomised_params`
    switches the randomisation on.
    """

    solenoid_settings: jax.Array = struct.field(
        default_factory=lambda: jnp.asarray(NOMINAL_SOLENOID_SETTINGS, jnp.float32)
    )
    """Normalised solenoid settings; field B_i = setting_i * reference_field."""
    reference_field: float = 2.682
    """Field (T) of a solenoid at normalised setting 1."""
    rigidity: float = struct.field(default_factory=magnetic_rigidity)
    """Beam magnetic rigidity B·rho (T·m)."""
    drift_before_solenoid: float = 0.085
    """Drift length (m) at the start of each cell."""
    solenoid_length: float = 0.25
    """Solenoid length (m); the corrector kick sits at its centre."""
    drift_after_solenoid: float = 0.305
    """Drift length (m) from the solenoid exit through the cavity to the BPM."""
    kick_per_unit: float = 1.0
    """Corrector calibration (mrad per setting unit)."""
    misalignment_halfwidth: float = 3.0
    """Solenoid offsets dx, dy ~ U(-w, w) mm, resampled at every reset."""
    injection_halfwidth: float = 0.6
    """Injection offsets x0, y0 ~ U(-w, w) mm, resampled at every reset."""
    solenoid_scale_halfwidth: float = 0.0
    """Common solenoid field scale ~ U(1 - w, 1 + w) per episode (0.05 with randomisation)."""
    corrector_gain_halfwidth: float = 0.0
    """Per-corrector gain ~ U(1 - w, 1 + w) per episode, multiplies the kick (0.1 randomised)."""
    bpm_noise_std: float = 0.0
    """Standard deviation (mm) of i.i.d. Gaussian noise on every reading (0.05 randomised)."""
    probe_setting: float = 0.3
    """All correctors are set to this value at reset to give the first state a probe response."""
    setting_limit: float = 40.0
    """Corrector settings are clipped to [-limit, limit]."""
    success_rms: float = 0.5
    """The episode terminates (success) when the measured RMS orbit (mm) is below this."""
    trend_weight: float = 0.4
    """Weight of the trend term D_t in the reward."""
    max_steps: int = 50
    """Episode horizon; the episode is truncated after this many steps."""


def nominal_params() -> OrbitParams:
    """Parameters of the nominal lattice: misalignments only, no randomisation, no BPM noise."""
    return OrbitParams()


def randomised_params() -> OrbitParams:
    """Domain randomisation: ±5 % solenoid scale, ±10 % corrector gains, 0.05 mm BPM noise."""
    return OrbitParams(
        solenoid_scale_halfwidth=0.05, corrector_gain_halfwidth=0.1, bpm_noise_std=0.05
    )


class LatticeErrors(struct.PyTreeNode):
    """Per-episode errors of the machine, resampled at reset."""

    solenoid_offsets: jax.Array
    """(NUM_CELLS, 2) transverse solenoid offsets (dx, dy) in mm."""
    injection_offset: jax.Array
    """(2,) injected beam offset (x0, y0) in mm."""
    solenoid_scale: jax.Array
    """() common factor on all solenoid fields."""
    corrector_gains: jax.Array
    """(NUM_READINGS,) gain of each corrector (multiplies the kick)."""


class OrbitState(struct.PyTreeNode):
    """Everything that changes during an episode."""

    settings: jax.Array
    """(NUM_READINGS,) corrector settings theta (x1, y1, x2, y2, ...)."""
    errors: LatticeErrors
    """This episode's machine errors."""
    readings: jax.Array
    """(NUM_READINGS,) last measured BPM readings b_t (mm)."""
    reading_change: jax.Array
    """(NUM_READINGS,) last change of the measured readings, delta b_t = b_t - b_{t-1}."""
    step_count: jax.Array
    """() number of steps taken in this episode."""


def nominal_errors() -> LatticeErrors:
    """A perfectly aligned machine: no offsets, unit solenoid scale and unit corrector gains."""
    return LatticeErrors(
        solenoid_offsets=jnp.zeros((NUM_CELLS, 2)),
        injection_offset=jnp.zeros(2),
        solenoid_scale=jnp.ones(()),
        corrector_gains=jnp.ones(NUM_READINGS),
    )


def sample_errors(key: jax.Array, params: OrbitParams) -> LatticeErrors:
    """Draw one episode's misalignments and domain randomisation from the parameter ranges.

    All variates come from one uniform draw scaled by their half-widths (one PRNG call instead of
    four keeps the compile time of ``reset`` down).
    """
    halfwidths = jnp.concatenate(
        [
            jnp.full(2 * NUM_CELLS, params.misalignment_halfwidth),
            jnp.full(2, params.injection_halfwidth),
            jnp.full(1, params.solenoid_scale_halfwidth),
            jnp.full(NUM_READINGS, params.corrector_gain_halfwidth),
        ]
    )
    draws = halfwidths * jax.random.uniform(key, halfwidths.shape, minval=-1.0, maxval=1.0)
    offsets, injection, scale, gains = jnp.split(
        draws, np.cumsum([2 * NUM_CELLS, 2, 1])
    )
    return LatticeErrors(
        solenoid_offsets=offsets.reshape(NUM_CELLS, 2),
        injection_offset=injection,
        solenoid_scale=1.0 + scale[0],
        corrector_gains=1.0 + gains,
    )


def drift_matrix(length: Any) -> jax.Array:
    """4x4 transfer matrix of a field-free drift acting on (x, x', y, y')."""
    block = jnp.array([[1.0, length], [0.0, 1.0]])
    return jax.scipy.linalg.block_diag(block, block)


def solenoid_matrix(field: Any, length: Any, rigidity: Any) -> jax.Array:
    """4x4 hard-edge solenoid transfer matrix on (x, x', y, y'); equals a drift at zero field.

    ``k = B / (2 B rho)``; ``S/k`` is written as ``L sinc(kL/pi)`` so that the zero-field limit is
    exact (no division by k) and differentiable.
    """
    k = field / (2.0 * rigidity)
    phase = k * length
    c, s = jnp.cos(phase), jnp.sin(phase)
    s_over_k = length * jnp.sinc(phase / jnp.pi)
    return jnp.array(
        [
            [c * c, c * s_over_k, s * c, s * s_over_k],
            [-k * s * c, c * c, -k * s * s, s * c],
            [-s * c, -s * s_over_k, c * c, c * s_over_k],
            [k * s * s, -s * c, -k * s * c, c * c],
        ]
    )


@jax.jit
def track_readings(settings: jax.Array, errors: LatticeErrors, params: OrbitParams) -> jax.Array:
    """Noise-free BPM readings (NUM_READINGS,) in mm for corrector settings ``settings``.

    Tracks the centroid cell by cell; a misaligned solenoid half maps ``z -> M (z - d) + d`` with
    ``d = (dx, 0, dy, 0)``, and the corrector kick sits between the two halves.
    """
    fields = params.solenoid_settings * params.reference_field * errors.solenoid_scale
    half_maps = jax.vmap(solenoid_matrix, in_axes=(0, None, None))(
        fields, 0.5 * params.solenoid_length, params.rigidity
    )
    kicks = (params.kick_per_unit * errors.corrector_gains * settings).reshape(NUM_CELLS, 2)
    entry_drift = drift_matrix(params.drift_before_solenoid)
    exit_drift = drift_matrix(params.drift_after_solenoid)
    transverse_to_phase_space = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    kick_to_phase_space = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])

    def through_cell(
        centroid: jax.Array, cell: tuple[jax.Array, ...]
    ) -> tuple[jax.Array, jax.Array]:
        half_map, offset_xy, kick_xy = cell
        offset = transverse_to_phase_space @ offset_xy
        centroid = entry_drift @ centroid
        centroid = half_map @ (centroid - offset) + offset
        centroid = centroid + kick_to_phase_space @ kick_xy
        centroid = half_map @ (centroid - offset) + offset
        centroid = exit_drift @ centroid
        return centroid, centroid[jnp.array([0, 2])]

    injected = transverse_to_phase_space @ errors.injection_offset
    _, readings = jax.lax.scan(
        through_cell, injected, (half_maps, errors.solenoid_offsets, kicks)
    )
    return readings.reshape(NUM_READINGS)


@jax.jit
def response_matrix(params: OrbitParams, errors: LatticeErrors | None = None) -> jax.Array:
    """Orbit response R = d b / d theta (NUM_READINGS x NUM_READINGS, mm per unit).

    The orbit is linear in the settings, so the forward-mode Jacobian is exact. Offsets do not
    change R; the solenoid scale and corrector gains of ``errors`` do (nominal when ``None``).
    """
    errors = nominal_errors() if errors is None else errors
    return jax.jacfwd(track_readings)(jnp.zeros(NUM_READINGS), errors, params)


def measure_readings(
    key: jax.Array, settings: jax.Array, errors: LatticeErrors, params: OrbitParams
) -> tuple[jax.Array, jax.Array]:
    """Return ``(measured, true)`` readings: the true orbit plus i.i.d. N(0, bpm_noise_std) noise.

    ``settings`` may carry leading batch axes (one reading per setting vector).
    """
    batched_track = jnp.vectorize(
        lambda theta: track_readings(theta, errors, params), signature="(n)->(n)"
    )
    true_readings = batched_track(settings)
    noise = params.bpm_noise_std * jax.random.normal(key, true_readings.shape)
    return true_readings + noise, true_readings


def rms_orbit(readings: jax.Array) -> jax.Array:
    """Root-mean-square of all readings, x and y together (mm)."""
    return jnp.sqrt(jnp.mean(jnp.square(readings), axis=-1))


def trend_score(readings: jax.Array, previous_readings: jax.Array) -> jax.Array:
    """D_t = (1/N^2) sum_i (+1 if |b_i| decreased else -4); no change counts as -4."""
    num_readings = readings.shape[-1]
    improved = jnp.abs(readings) < jnp.abs(previous_readings)
    return jnp.sum(jnp.where(improved, 1.0, -4.0), axis=-1) / num_readings**2


def orbit_reward(
    readings: jax.Array, previous_readings: jax.Array, step_count: jax.Array, params: OrbitParams
) -> tuple[jax.Array, jax.Array]:
    """TBSAC reward for reaching ``readings`` at 1-based step ``step_count``; (reward, success).

    ``-RMS(b_t) + trend_weight * D_t``, plus ``50 + 3 (max_steps + 1 - j)`` on success at step j.
    """
    success = rms_orbit(readings) < params.success_rms
    bonus = jnp.where(success, 50.0 + 3.0 * (params.max_steps + 1 - step_count), 0.0)
    trend = params.trend_weight * trend_score(readings, previous_readings)
    reward = -rms_orbit(readings) + trend + bonus
    return reward.astype(jnp.float32), success


def trend_observation(
    previous_change: jax.Array, change: jax.Array, readings: jax.Array
) -> jax.Array:
    """The 30-D TBSAC state [delta b_{t-1}, delta b_t, b_t] as float32."""
    return jnp.concatenate([previous_change, change, readings]).astype(jnp.float32)


class OrbitCorrectionCore(JaxEnv[OrbitState, OrbitParams]):
    """Functional orbit-correction environment (TBSAC interface) on the linear-optics surrogate.

    ``domain_randomisation`` only chooses :meth:`default_params` (nominal or randomised); any
    ``OrbitParams`` may be passed to ``reset``/``step``.
    """

    def __init__(self, domain_randomisation: bool = False) -> None:
        self.domain_randomisation = domain_randomisation

    def default_params(self) -> OrbitParams:
        """Randomised parameters when built with ``domain_randomisation``, else the nominal ones."""
        return randomised_params() if self.domain_randomisation else nominal_params()

    def reset(self, key: jax.Array, params: OrbitParams) -> tuple[jax.Array, OrbitState]:
        """Resample errors, read the orbit at theta = 0, then apply the probe and read again."""
        key_errors, key_noise = jax.random.split(key)
        errors = sample_errors(key_errors, params)
        settings = jnp.full(NUM_READINGS, params.probe_setting, dtype=jnp.float32)
        # Both readings in one batch so that reset needs one noise draw.
        unset_and_probed = jnp.stack([jnp.zeros(NUM_READINGS), settings])
        unset_readings, readings = measure_readings(key_noise, unset_and_probed, errors, params)[0]
        change = readings - unset_readings
        state = OrbitState(
            settings=settings,
            errors=errors,
            readings=readings,
            reading_change=change,
            step_count=jnp.zeros((), jnp.int32),
        )
        return trend_observation(jnp.zeros(NUM_READINGS), change, readings), state

    def step(
        self, key: jax.Array, state: OrbitState, action: jax.Array, params: OrbitParams
    ) -> StepResult:
        """Add the action (clipped to [-1, 1]) to the settings, clip them, and read the BPMs.

        ``terminated`` is success (measured RMS below ``success_rms``); ``truncated`` is reaching
        ``max_steps`` without success, so the two are never both true.
        """
        increment = jnp.clip(action, -1.0, 1.0)
        settings = jnp.clip(
            state.settings + increment, -params.setting_limit, params.setting_limit
        )
        readings, true_readings = measure_readings(key, settings, state.errors, params)
        change = readings - state.readings
        step_count = state.step_count + 1
        reward, success = orbit_reward(readings, state.readings, step_count, params)
        truncated = jnp.logical_and(step_count >= params.max_steps, jnp.logical_not(success))
        next_state = OrbitState(
            settings=settings,
            errors=state.errors,
            readings=readings,
            reading_change=change,
            step_count=step_count,
        )
        info = {
            "rms": rms_orbit(readings),
            "true_rms": rms_orbit(true_readings),
            "is_success": success,
        }
        observation = trend_observation(state.reading_change, change, readings)
        return StepResult(observation, next_state, reward, success, truncated, info)

    def observation_space(self, params: OrbitParams) -> gym.spaces.Box:
        """``Box(-10, 10, (30,))`` as declared by TBSAC; readings beyond 10 mm are not clipped."""
        return gym.spaces.Box(
            -OBSERVATION_BOUND, OBSERVATION_BOUND, (OBSERVATION_SIZE,), np.float32
        )

    def action_space(self, params: OrbitParams) -> gym.spaces.Box:
        """Corrector increments in ``[-1, 1]^10``."""
        return gym.spaces.Box(-1.0, 1.0, (NUM_READINGS,), np.float32)


def truncated_pseudo_inverse(matrix: jax.Array, relative_cutoff: float = 1e-3) -> jax.Array:
    """Pseudo-inverse that drops singular values below ``relative_cutoff * sigma_max``."""
    return jnp.linalg.pinv(matrix, rtol=relative_cutoff)


def expert_pseudo_inverse(params: OrbitParams | None = None) -> jax.Array:
    """Truncated pseudo-inverse of the nominal response matrix (unit scale and gains)."""
    params = nominal_params() if params is None else params
    return truncated_pseudo_inverse(response_matrix(params))


def svd_expert_action(
    observation: jax.Array, response_pseudo_inverse: jax.Array, gain: Any = 0.7
) -> jax.Array:
    """SVD least-squares correction step ``clip(-gain R^+ b_t, -1, 1)`` from a trend observation.

    ``observation`` may carry leading batch axes; ``b_t`` is its last NUM_READINGS entries.
    """
    readings = observation[..., -NUM_READINGS:]
    return jnp.clip(-gain * readings @ response_pseudo_inverse.T, -1.0, 1.0)


def noisy_svd_expert_action(
    key: jax.Array,
    observation: jax.Array,
    response_pseudo_inverse: jax.Array,
    gain: Any = 0.7,
    noise_scale: Any = 0.3,
) -> jax.Array:
    """The SVD expert action plus N(0, noise_scale) noise per component, clipped to [-1, 1]."""
    action = svd_expert_action(observation, response_pseudo_inverse, gain)
    noise = noise_scale * jax.random.normal(key, action.shape)
    return jnp.clip(action + noise, -1.0, 1.0)


def _checked_params(base: OrbitParams, overrides: dict[str, Any]) -> OrbitParams:
    """``base`` with ``overrides`` applied, rejecting unknown names and impossible values."""
    known = set(OrbitParams.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown OrbitParams field(s) {unknown}; expected some of {sorted(known)}"
        )
    params = base.replace(**overrides)
    non_negative = (
        "misalignment_halfwidth",
        "injection_halfwidth",
        "solenoid_scale_halfwidth",
        "corrector_gain_halfwidth",
        "bpm_noise_std",
    )
    for name in non_negative:
        if float(getattr(params, name)) < 0.0:
            raise ValueError(f"OrbitParams.{name} must be >= 0, got {getattr(params, name)}")
    for name in ("rigidity", "setting_limit", "success_rms", "max_steps"):
        if float(getattr(params, name)) <= 0.0:
            raise ValueError(f"OrbitParams.{name} must be > 0, got {getattr(params, name)}")
    if np.shape(params.solenoid_settings) != (NUM_CELLS,):
        raise ValueError(
            f"OrbitParams.solenoid_settings must have shape ({NUM_CELLS},), "
            f"got {np.shape(params.solenoid_settings)}"
        )
    return params


def make_orbit_env(domain_randomisation: bool = False, **overrides: Any) -> gym.Env:
    """Gymnasium orbit-correction env (``o2o/OrbitCorrection-v0``) on :class:`OrbitCorrectionCore`.

    ``domain_randomisation=True`` starts from :func:`randomised_params`; any ``OrbitParams`` field
    may be overridden by keyword (e.g. ``bpm_noise_std=0.0``); unknown names or impossible values
    raise ``ValueError``.
    """
    core = OrbitCorrectionCore(domain_randomisation)
    params = _checked_params(core.default_params(), overrides)
    return GymnasiumFace(core, params)
