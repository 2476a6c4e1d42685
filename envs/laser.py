"""Laser pulse temporal-shape optimisation after TempoRL (``o2o/LaserPulse-v0``).

A semi-physical model of the L1 pump laser chain (ELI Beamlines): a seed spectrum is stretched by a
controllable spectral phase (GDD, TOD, FOD), amplified in 50 passes through Yb:YAG (gain
narrowing), picks up a self-phase from the B-integral, and is recompressed by a fixed compressor.
The temporal intensity follows from a zero-padded inverse FFT and is compared with the
transform-limited (TL) pulse through its FWHM and the peak-intensity ratio ``x = I_peak / I_peak,TL``.

Pieces, in pipeline order:

- :class:`SpectralInput` holds the seed field and the amplifier's amplitude transfer on the laser
  frequency grid. :func:`parametric_spectrum_and_gain` builds the data-free Gaussian default;
  :func:`load_measured_spectrum_and_gain` reads the measured TempoRL files from a user directory.
- :func:`build_pulse_model` turns that into the constant arrays of a :class:`PulseModel` (numpy,
  float64, once), including the TL profile.
- :func:`pulse_metrics` / :func:`temporal_profile` run the forward pass for given controls and B as
  pure ``jnp`` code (jittable, vmappable).
- :class:`LaserPulseCore` is the functional MDP ("MDP-2" of TempoRL, v2); :func:`make_laser_env`
  returns its gymnasium face.

Precision: in SI units ``Omega**4`` (~1e51) overflows float32, and even in picosecond units the
stretcher phase reaches ~7e3 rad, where a float32 ulp is ~5e-4 rad. All phases here are in ps /
rad·ps⁻¹ units, and by default (``precision="float64"``) the forward pass runs in float64 /
complex128 inside a *scoped* ``jax.enable_x64(True)`` block (:func:`precision_scope`). The block
is entered while the forward pass is traced, so it works under any outer ``jit``/``vmap``/``scan``
and the global x64 flag is never changed: the rest of the framework keeps float32, and the
environment's observations, rewards and info leave the block as float32. Caveat: a scoped x64
block inside traced code is only sound for primitives whose lowering does not rebuild constants
under the *global* flag; ``jnp.argmax`` does, so :func:`first_true_index` replaces it. If a future
JAX or backend breaks this, ``precision="float32"`` runs the same code in float32 / complex64
without any x64 scope (it agrees with float64 to ~1e-6 in x and FWHM; only the B = 0 exact-TL check
needs float64).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import scipy.constants
import scipy.interpolate
from flax import struct

from envs.jax_env import GymnasiumFace, JaxEnv, StepResult

Precision = Literal["float64", "float32"]
FwhmMode = Literal["linear", "reference"]
GainMapping = Literal["reference", "physical"]
ObservationMode = Literal["psi", "psi+profile"]

SPEED_OF_LIGHT = scipy.constants.c
BAND_HZ = (289.95e12, 291.91e12)
NUM_FREQUENCIES = 5_000
NUM_AMPLIFIER_PASSES = 50
TIME_PADDING = 15_000
"""Zeros added on each side of the spectrum before the inverse FFT to the time domain."""
GAIN_RED_SHIFT_NM = 1.0
PULSE_ENERGY_J = 0.22
BEAM_RADIUS_M = 12e-3
PEAK_INTENSITY_DT_S = 7.3386e-14
"""Fixed time step of the peak-intensity integral (TempoRL's value, also used for other grids)."""

COMPRESSOR_PS = (-267.422, 2.384, -0.0954893)
"""Fixed compressor (GDD ps², TOD ps³, FOD ps⁴)."""
CONTROL_LOWER_PS = (235.22, -100.3635, 0.04774465)
CONTROL_UPPER_PS = (299.624, 95.5955, 0.14323395)
"""Control box (GDD ps², TOD ps³, FOD ps⁴); centred on ``-COMPRESSOR_PS``."""

PARAMETRIC_SPECTRUM_CENTER_HZ = 290.848e12
PARAMETRIC_SPECTRUM_FWHM_HZ = 0.3486e12
PARAMETRIC_GAIN_CENTER_HZ = 290.82e12
PARAMETRIC_GAIN_FWHM_HZ = 2.96e12

PROFILE_BINS = 128
PROFILE_HALF_WINDOW_PS = 10.0
NUM_CONTROLS = 3


# --------------------------------------------------------------------------------------------
# Spectrum and gain
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SpectralInput:
    """Seed field and amplifier transfer on the laser frequency grid (numpy, float64)."""

    frequency_hz: np.ndarray
    """Uniform frequency grid F_k (Hz), ascending."""
    field: np.ndarray
    """Seed spectral field amplitude E(F_k) (square root of the peak-normalised intensity)."""
    gain_amplitude: np.ndarray
    """Amplitude transfer A_g(F_k) of all amplifier passes (per-pass intensity gain g: g**(n/2))."""
    carrier_hz: float
    """Carrier f0; the spectral phase is expanded in Omega = 2 pi (F - f0)."""
    spectrum_rows_kept: int | None = None
    """Measured spectrum rows inside the band (None for the parametric default)."""
    gain_points_kept: int | None = None
    """Measured gain points inside the laser grid (None for the parametric default)."""


def outer_crossings(axis: Any, values: Any, level: Any, xp: Any = jnp) -> tuple[Any, Any]:
    """Abscissae of the first rise to and the last fall from ``level`` (linear interpolation).

    ``i1`` is the first index with ``values >= level``, ``i2`` the last; the left crossing is
    interpolated between ``i1 - 1`` and ``i1``, the right one between ``i2`` and ``i2 + 1``. Written
    for any array module (``xp`` = ``numpy`` or ``jax.numpy``) so that construction-time numpy code
    and the traced step share one rule; with a traced ``values`` it is jit/vmap-safe.
    """
    size = values.shape[-1]
    above = values >= level
    first = first_true_index(above, xp)
    last = size - 1 - first_true_index(above[::-1], xp)
    before_first = xp.maximum(first - 1, 0)
    after_last = xp.minimum(last + 1, size - 1)
    left = _linear_crossing(axis[before_first], axis[first], values[before_first], values[first], level, xp)
    right = _linear_crossing(axis[last], axis[after_last], values[last], values[after_last], level, xp)
    return left, right


def first_true_index(mask: Any, xp: Any = jnp) -> Any:
    """Index of the first True of a 1-D mask (0 when there is none), like ``argmax(mask)``.

    Hand-written because ``jnp.argmax`` lowers through a helper that rebuilds its initial values
    under the *outer* x64 flag, which breaks inside the scoped-x64 forward pass (jax issue #5982
    family); this min-reduction lowers from the traced dtypes alone.
    """
    size = mask.shape[-1]
    index = xp.min(xp.where(mask, xp.arange(size), size))
    return xp.where(index == size, 0, index)


def _linear_crossing(x0: Any, x1: Any, y0: Any, y1: Any, level: Any, xp: Any) -> Any:
    """Where the segment (x0, y0)-(x1, y1) meets ``level``; ``x0`` for a flat segment."""
    rise = y1 - y0
    flat = rise == 0
    fraction = xp.where(flat, 0.0, (level - y0) / xp.where(flat, 1.0, rise))
    return x0 + fraction * (x1 - x0)


def laser_frequency_grid(band_hz: tuple[float, float] = BAND_HZ, num_frequencies: int = NUM_FREQUENCIES) -> np.ndarray:
    """The parametric model's uniform frequency grid over the band (Hz)."""
    return np.linspace(band_hz[0], band_hz[1], num_frequencies)


def parametric_spectrum_and_gain(
    spectrum_center_hz: float = PARAMETRIC_SPECTRUM_CENTER_HZ,
    spectrum_fwhm_hz: float = PARAMETRIC_SPECTRUM_FWHM_HZ,
    gain_center_hz: float = PARAMETRIC_GAIN_CENTER_HZ,
    gain_fwhm_hz: float = PARAMETRIC_GAIN_FWHM_HZ,
    num_passes: int = NUM_AMPLIFIER_PASSES,
    band_hz: tuple[float, float] = BAND_HZ,
    num_frequencies: int = NUM_FREQUENCIES,
) -> SpectralInput:
    """Built-in data-free default: Gaussian seed intensity and Gaussian per-pass Yb:YAG gain.

    The seed intensity has FWHM ``spectrum_fwhm_hz`` (field ``exp(-2 ln2 ((F - f_s)/FWHM)^2)``);
    the per-pass intensity gain ``g = exp(-4 ln2 ((F - f_g)/FWHM_g)^2)`` gives the amplitude transfer
    ``g**(num_passes/2)``. The carrier is the seed centre.
    """
    frequency_hz = laser_frequency_grid(band_hz, num_frequencies)
    field = np.exp(-2.0 * np.log(2.0) * ((frequency_hz - spectrum_center_hz) / spectrum_fwhm_hz) ** 2)
    gain = np.exp(-4.0 * np.log(2.0) * ((frequency_hz - gain_center_hz) / gain_fwhm_hz) ** 2)
    return SpectralInput(
        frequency_hz=frequency_hz,
        field=field,
        gain_amplitude=gain ** (num_passes / 2),
        carrier_hz=float(spectrum_center_hz),
    )


def read_spectrum_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a header-less ``wavelength_nm,raw_intensity`` CSV; returns (wavelength_nm, intensity)."""
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    if table.shape[1] != 2:
        raise ValueError(f"spectrum file {path}: expected 2 columns (wavelength_nm, intensity), got {table.shape[1]}")
    return table[:, 0], table[:, 1]


def read_gain_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a whitespace-separated ``wavelength_nm gain`` file whose header lines start with ``"``."""
    table = np.loadtxt(path, comments='"', ndmin=2)
    if table.shape[1] != 2:
        raise ValueError(f"gain file {path}: expected 2 columns (wavelength_nm, gain), got {table.shape[1]}")
    return table[:, 0], table[:, 1]


def _ascending_frequency(wavelength_nm: np.ndarray, values: np.ndarray, shift_nm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Convert a wavelength table to frequency (Hz) and sort it by ascending frequency."""
    frequency_hz = SPEED_OF_LIGHT / ((wavelength_nm + shift_nm) * 1e-9)
    order = np.argsort(frequency_hz, kind="stable")
    return frequency_hz[order], values[order]


def _inclusive_cut(frequency_hz: np.ndarray, low_hz: float, high_hz: float) -> slice:
    """Rows from the first with f >= low to the last with f <= high (inclusive), on sorted f."""
    start = int(np.argmax(frequency_hz >= low_hz))
    stop = len(frequency_hz) - int(np.argmax((frequency_hz <= high_hz)[::-1]))
    if not (frequency_hz[start] >= low_hz and frequency_hz[stop - 1] <= high_hz and stop - start >= 4):
        raise ValueError(f"fewer than 4 samples in [{low_hz:.6g}, {high_hz:.6g}] Hz")
    return slice(start, stop)


def load_measured_spectrum_and_gain(
    directory: str | Path,
    *,
    gain_mapping: GainMapping = "reference",
    spectrum_file: str = "L1_pump_spectrum.csv",
    gain_file: str = "cristal_gain.txt",
    num_passes: int = NUM_AMPLIFIER_PASSES,
    band_hz: tuple[float, float] = BAND_HZ,
    num_frequencies: int = NUM_FREQUENCIES,
) -> SpectralInput:
    """Load a measured seed spectrum and Yb:YAG gain curve (TempoRL file formats).

    Spectrum: frequency ``c/lambda``, negative counts clipped, peak-normalised over the whole file,
    field ``sqrt(I)``, cut to ``band_hz`` and resampled onto ``num_frequencies`` uniform points
    spanning the kept rows with a not-a-knot cubic spline; the carrier is the midpoint of the
    outermost crossings of the field with half its maximum.

    Gain: peak-normalised, shifted 1 nm to the red, amplitude ``sqrt(g)``, cut to the laser grid
    and spline-resampled the same way over its own kept span. ``gain_mapping="reference"`` lays
    that vector index by index on the laser grid (TempoRL's behaviour, a linear stretch of the gain
    axis); ``"physical"`` evaluates the spline at the laser frequencies. The amplitude transfer is
    ``sqrt(g)**num_passes``.
    """
    if gain_mapping not in ("reference", "physical"):
        raise ValueError(f"gain_mapping must be 'reference' or 'physical', got {gain_mapping!r}")
    directory = Path(directory)

    wavelength_nm, counts = read_spectrum_file(directory / spectrum_file)
    spectrum_hz, intensity = _ascending_frequency(wavelength_nm, np.clip(counts, 0.0, None))
    field = np.sqrt(intensity / intensity.max())
    band = _inclusive_cut(spectrum_hz, *band_hz)
    frequency_hz = np.linspace(spectrum_hz[band][0], spectrum_hz[band][-1], num_frequencies)
    laser_field = scipy.interpolate.CubicSpline(spectrum_hz[band], field[band], bc_type="not-a-knot")(frequency_hz)
    left_hz, right_hz = outer_crossings(frequency_hz, laser_field, laser_field.max() / 2, xp=np)

    gain_wavelength_nm, gain_counts = read_gain_file(directory / gain_file)
    gain_hz, gain = _ascending_frequency(gain_wavelength_nm, gain_counts / gain_counts.max(), GAIN_RED_SHIFT_NM)
    inside = _inclusive_cut(gain_hz, frequency_hz[0], frequency_hz[-1])
    gain_spline = scipy.interpolate.CubicSpline(gain_hz[inside], np.sqrt(gain[inside]), bc_type="not-a-knot")
    if gain_mapping == "reference":
        gain_field = gain_spline(np.linspace(gain_hz[inside][0], gain_hz[inside][-1], num_frequencies))
    else:
        gain_field = gain_spline(frequency_hz)

    return SpectralInput(
        frequency_hz=frequency_hz,
        field=laser_field,
        gain_amplitude=gain_field**num_passes,
        carrier_hz=float((left_hz + right_hz) / 2),
        spectrum_rows_kept=band.stop - band.start,
        gain_points_kept=inside.stop - inside.start,
    )


# --------------------------------------------------------------------------------------------
# Forward model
# --------------------------------------------------------------------------------------------


def psi_to_controls(psi: Any, xp: Any = jnp) -> Any:
    """Normalised controls psi in [0, 1]^3 -> (GDD ps², TOD ps³, FOD ps⁴)."""
    lower = xp.asarray(CONTROL_LOWER_PS)
    upper = xp.asarray(CONTROL_UPPER_PS)
    return lower + psi * (upper - lower)


def controls_to_psi(controls_ps: Any, xp: Any = jnp) -> Any:
    """(GDD ps², TOD ps³, FOD ps⁴) -> normalised controls psi (1/2 at the box centre)."""
    lower = xp.asarray(CONTROL_LOWER_PS)
    upper = xp.asarray(CONTROL_UPPER_PS)
    return (controls_ps - lower) / (upper - lower)


def spectral_phase(omega_rad_per_ps: Any, controls_ps: Any) -> Any:
    """Taylor phase GDD Ω²/2 + TOD Ω³/6 + FOD Ω⁴/24 (rad) for Ω in rad/ps and controls in ps^n."""
    omega_squared = omega_rad_per_ps**2
    return (
        controls_ps[0] * omega_squared / 2
        + controls_ps[1] * omega_squared * omega_rad_per_ps / 6
        + controls_ps[2] * omega_squared * omega_squared / 24
    )


def padded_temporal_intensity(spectral_field: Any, padding: int = TIME_PADDING, xp: Any = jnp) -> Any:
    """Peak-normalised |IFFT|² of the spectrum zero-padded by ``padding`` on each side, centred."""
    padded = xp.pad(spectral_field, (padding, padding))
    pulse = xp.fft.ifftshift(xp.fft.ifft(padded))
    intensity = pulse.real**2 + pulse.imag**2
    return intensity / intensity.max()


@dataclasses.dataclass(frozen=True, eq=False)
class PulseModel:
    """Constant arrays of the forward pass, built once in numpy float64 by :func:`build_pulse_model`."""

    omega_rad_per_ps: np.ndarray
    """Angular frequency offsets 2 pi (F - f0) in rad/ps."""
    amplified_field: np.ndarray
    """Seed field times amplifier amplitude transfer, E·A_g (real)."""
    compressor_ps: np.ndarray
    """Fixed compressor (GDD ps², TOD ps³, FOD ps⁴)."""
    time_ps: np.ndarray
    """Time axis of the padded profile: linspace(-1/(2 df), 1/(2 df), N_t) in ps."""
    tl_profile: np.ndarray
    """Transform-limited intensity profile (peak 1)."""
    tl_integral: float
    """Trapezoid sum of the TL profile (unit step); x = tl_integral / integral."""
    tl_peak_index: int
    """argmax of the TL profile, the alignment reference of the L1 regret."""
    padding: int = TIME_PADDING
    """Zeros on each side of the spectrum before the time-domain IFFT."""

    @property
    def tl_fwhm_ps(self) -> float:
        """FWHM (ps) of the TL pulse, linear-crossing rule."""
        left, right = outer_crossings(self.time_ps, self.tl_profile, 0.5, xp=np)
        return float(right - left)

    @property
    def tl_peak_intensity_tw_m2(self) -> float:
        """Peak intensity (TW/m²) of the TL pulse."""
        return float(peak_intensity_tw_m2(self.tl_integral))


def build_pulse_model(
    spectral: SpectralInput, compressor_ps: tuple[float, float, float] = COMPRESSOR_PS, padding: int = TIME_PADDING
) -> PulseModel:
    """Precompute Ω, E·A_g, the time axis and the transform-limited profile (numpy, float64)."""
    frequency_hz = np.asarray(spectral.frequency_hz, np.float64)
    amplified_field = np.asarray(spectral.field * spectral.gain_amplitude, np.float64)
    tl_profile = padded_temporal_intensity(amplified_field.astype(np.complex128), padding, xp=np)
    window_ps = 1e12 / (frequency_hz[1] - frequency_hz[0])
    return PulseModel(
        omega_rad_per_ps=2 * np.pi * (frequency_hz - spectral.carrier_hz) * 1e-12,
        amplified_field=amplified_field,
        compressor_ps=np.asarray(compressor_ps, np.float64),
        time_ps=np.linspace(-window_ps / 2, window_ps / 2, len(tl_profile)),
        tl_profile=tl_profile,
        tl_integral=float(np.trapezoid(tl_profile)),
        tl_peak_index=int(np.argmax(tl_profile)),
        padding=padding,
    )


def default_pulse_model() -> PulseModel:
    """The pulse model of the built-in parametric spectrum and gain."""
    return build_pulse_model(parametric_spectrum_and_gain())


def precision_scope(precision: Precision) -> contextlib.AbstractContextManager:
    """Context in which the forward pass runs: scoped x64 for ``"float64"``, nothing for ``"float32"``."""
    if precision == "float64":
        return jax.enable_x64(True)
    if precision == "float32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")


def _real_dtype(precision: Precision) -> Any:
    return jnp.float64 if precision == "float64" else jnp.float32


def _output_spectral_field(model: PulseModel, controls_ps: jax.Array, b_integral: jax.Array, precision: Precision) -> jax.Array:
    """Stretcher phase, gain, B-integral self-phase and compressor; call inside the precision scope."""
    real = _real_dtype(precision)
    omega = jnp.asarray(model.omega_rad_per_ps, real)
    controls_ps = jnp.asarray(controls_ps).astype(real)
    stretched = jnp.asarray(model.amplified_field, real) * jnp.exp(1j * spectral_phase(omega, controls_ps))
    pulse = jnp.fft.ifft(stretched)
    power = pulse.real**2 + pulse.imag**2
    pulse = pulse * jnp.exp(1j * jnp.asarray(b_integral).astype(real) * power / power.max())
    compressor = jnp.asarray(model.compressor_ps, real)
    return jnp.fft.fft(pulse) * jnp.exp(1j * spectral_phase(omega, compressor))


def temporal_profile(model: PulseModel, controls_ps: Any, b_integral: Any, precision: Precision = "float64") -> jax.Array:
    """Peak-normalised temporal intensity on ``model.time_ps`` for controls (ps units) and B.

    Pure ``jnp``; jittable and vmappable. The result has the dtype of ``precision``.
    """
    with precision_scope(precision):
        field = _output_spectral_field(model, controls_ps, b_integral, precision)
        return padded_temporal_intensity(field, model.padding)


class PulseMetrics(NamedTuple):
    """Figures of merit of one output pulse (scalars, or arrays under vmap)."""

    fwhm_ps: jax.Array
    """Full width at half maximum (ps)."""
    peak_intensity_ratio: jax.Array
    """x = I_peak / I_peak,TL = integral(I_TL) / integral(I) (the "Strehl-like" ratio)."""
    peak_intensity_tw_m2: jax.Array
    """Peak intensity 2 E_p / (pi w0² ∫I dt) in TW/m²."""
    l1_regret: jax.Array
    """Sum |I - I_TL| after circularly aligning the peaks."""
    peak_time_ps: jax.Array
    """Time of the profile maximum (ps)."""


def peak_intensity_tw_m2(profile_integral: Any) -> Any:
    """Peak intensity (TW/m²) of a pulse whose peak-normalised profile sums (trapezoid) to this."""
    fluence = 2 * PULSE_ENERGY_J / (math.pi * BEAM_RADIUS_M**2)
    return fluence / (profile_integral * PEAK_INTENSITY_DT_S) / 1e12


def profile_fwhm(time_ps: Any, profile: Any, fwhm_mode: FwhmMode = "linear", xp: Any = jnp) -> Any:
    """FWHM of a peak-normalised profile; ``"reference"`` returns TempoRL's |t_left| + |t_right|."""
    left, right = outer_crossings(time_ps, profile, 0.5, xp=xp)
    if fwhm_mode == "linear":
        return right - left
    if fwhm_mode == "reference":
        return xp.abs(left) + xp.abs(right)
    raise ValueError(f"fwhm_mode must be 'linear' or 'reference', got {fwhm_mode!r}")


def profile_metrics(model: PulseModel, profile: jax.Array, fwhm_mode: FwhmMode = "linear") -> PulseMetrics:
    """FWHM, x, peak intensity and L1 regret of a profile on ``model.time_ps`` (in its dtype)."""
    real = profile.dtype
    time_ps = jnp.asarray(model.time_ps, real)
    integral = jnp.trapezoid(profile)
    peak_index = first_true_index(profile == profile.max())
    aligned = jnp.roll(profile, model.tl_peak_index - peak_index)
    return PulseMetrics(
        fwhm_ps=profile_fwhm(time_ps, profile, fwhm_mode),
        peak_intensity_ratio=jnp.asarray(model.tl_integral, real) / integral,
        peak_intensity_tw_m2=peak_intensity_tw_m2(integral),
        l1_regret=jnp.sum(jnp.abs(aligned - jnp.asarray(model.tl_profile, real))),
        peak_time_ps=time_ps[peak_index],
    )


def pulse_metrics(
    model: PulseModel,
    controls_ps: Any,
    b_integral: Any,
    precision: Precision = "float64",
    fwhm_mode: FwhmMode = "linear",
) -> PulseMetrics:
    """Forward pass and figures of merit for controls (ps units) and B; pure and jittable.

    Results keep the dtype of ``precision``: with the default they are float64 arrays, so convert
    them (``float``, ``np.asarray``) before mixing them into float32 ``jnp`` code outside the x64
    scope, which would otherwise truncate them with a warning.
    """
    with precision_scope(precision):
        return profile_metrics(model, temporal_profile(model, controls_ps, b_integral, precision), fwhm_mode)


def pulse_metrics_at_psi(
    model: PulseModel,
    psi: Any,
    b_integral: Any,
    precision: Precision = "float64",
    fwhm_mode: FwhmMode = "linear",
) -> PulseMetrics:
    """:func:`pulse_metrics` for normalised controls psi (converted to ps units in ``precision``)."""
    with precision_scope(precision):
        controls_ps = psi_to_controls(jnp.asarray(psi).astype(_real_dtype(precision)))
        return pulse_metrics(model, controls_ps, b_integral, precision, fwhm_mode)


def transform_limited_fwhm(model: PulseModel) -> float:
    """FWHM (ps) of the transform-limited pulse of a model."""
    return model.tl_fwhm_ps


def resampled_profile(time_ps: jax.Array, profile: jax.Array, center_ps: jax.Array) -> jax.Array:
    """The profile at ``PROFILE_BINS`` points over ±``PROFILE_HALF_WINDOW_PS`` around ``center_ps``."""
    offsets = jnp.linspace(-PROFILE_HALF_WINDOW_PS, PROFILE_HALF_WINDOW_PS, PROFILE_BINS, dtype=time_ps.dtype)
    return jnp.interp(center_ps + offsets, time_ps, profile)


# --------------------------------------------------------------------------------------------
# MDP
# --------------------------------------------------------------------------------------------


class LaserParams(struct.PyTreeNode):
    """Task settings of the v2 MDP (a pytree: every field may be traced or vmapped)."""

    b_integral: float = 2.0
    """Nonlinearity B of every episode when the core does not randomise B."""
    b_low: float = 1.0
    """Lower end of B ~ U(b_low, b_high) at reset when the core randomises B."""
    b_high: float = 3.5
    """Upper end of the randomised B."""
    reset_std: float = math.sqrt(0.1)
    """psi0 ~ N(1/2, reset_std² I), clipped to [0, 1]³ (variance 0.1 in TempoRL)."""
    action_scale: float = 0.1
    """psi moves by action_scale·a per step."""
    alive_coeff: float = 1.0
    """c_h; the per-step alive term is (0.2 c_h)²."""
    intensity_coeff: float = 1.0
    """c_I, weight of the intensity term min(0.1/(1 - x) - 0.1, cap)."""
    intensity_cap: float = 7.0
    """Upper cap of the intensity term."""
    fwhm_coeff: float = 0.1
    """Penalty per ps of FWHM."""
    max_fwhm_ps: float = 20.0
    """The episode terminates when the FWHM reaches this (ps)."""
    termination_penalty: float = 20.0
    """Subtracted from the reward of the terminating step."""
    max_steps: int = 50
    """Episodes are truncated after this many steps."""


class LaserState(struct.PyTreeNode):
    """Per-episode state: the normalised controls, this episode's B and the step counter."""

    psi: jax.Array
    """(3,) float32 normalised (GDD, TOD, FOD) in [0, 1]."""
    b_integral: jax.Array
    """() float32 B of this episode."""
    step: jax.Array
    """() int32 steps taken."""


def v2_reward(
    fwhm_ps: jax.Array, peak_intensity_ratio: jax.Array, terminated: jax.Array, params: LaserParams
) -> jax.Array:
    """TempoRL v2 reward: (0.2 c_h)² + c_I·min(0.1/(1 - x) - 0.1, cap) - 0.1·FWHM - 20·[terminated].

    x is clipped to at most 1; 1 - x is floored at 1e-12 so that x = 1 gives the cap, not inf.
    """
    x = jnp.minimum(peak_intensity_ratio, 1.0)
    intensity_term = jnp.minimum(0.1 / jnp.maximum(1.0 - x, 1e-12) - 0.1, params.intensity_cap)
    reward = (
        (0.2 * params.alive_coeff) ** 2
        + params.intensity_coeff * intensity_term
        - params.fwhm_coeff * fwhm_ps
    )
    return reward - jnp.where(terminated, params.termination_penalty, 0.0)


class LaserPulseCore(JaxEnv[LaserState, LaserParams]):
    """Functional TempoRL v2 MDP: delta actions on the normalised stretcher controls.

    Observation ``psi`` (3,), optionally followed by the peak-aligned profile (128 bins over
    ±10 ps, ``observation="psi+profile"``) and, when B is randomised (``b_range`` given), by this
    episode's B. Step order: count the step, apply the clipped action, compute the new pulse, reward
    on the new state, then ``terminated`` (FWHM >= max_fwhm_ps, with the penalty) and ``truncated``
    (step cap reached without termination); the two are never both true.
    """

    def __init__(
        self,
        model: PulseModel | None = None,
        *,
        observation: ObservationMode = "psi",
        b_range: tuple[float, float] | None = None,
        precision: Precision = "float64",
        fwhm_mode: FwhmMode = "linear",
    ) -> None:
        if observation not in ("psi", "psi+profile"):
            raise ValueError(f"observation must be 'psi' or 'psi+profile', got {observation!r}")
        if b_range is not None and not (len(b_range) == 2 and 0.0 <= b_range[0] <= b_range[1]):
            raise ValueError(f"b_range must be (low, high) with 0 <= low <= high, got {b_range!r}")
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
        if fwhm_mode not in ("linear", "reference"):
            raise ValueError(f"fwhm_mode must be 'linear' or 'reference', got {fwhm_mode!r}")
        self.model = default_pulse_model() if model is None else model
        self.observation = observation
        self.b_range = None if b_range is None else (float(b_range[0]), float(b_range[1]))
        self.precision = precision
        self.fwhm_mode = fwhm_mode

    def trace_scope(self) -> contextlib.AbstractContextManager:
        """The precision scope of the forward pass (see :meth:`JaxEnv.trace_scope`)."""
        return precision_scope(self.precision)

    @property
    def randomises_b(self) -> bool:
        """Whether B is drawn at every reset (and then observed)."""
        return self.b_range is not None

    def default_params(self) -> LaserParams:
        """Nominal v2 settings; the B range comes from the constructor when given."""
        if self.b_range is None:
            return LaserParams()
        return LaserParams(b_low=self.b_range[0], b_high=self.b_range[1])

    def evaluate(self, psi: jax.Array, b_integral: jax.Array) -> tuple[PulseMetrics, jax.Array]:
        """Figures of merit (float32) and the observed profile (float32, empty unless observed)."""
        with precision_scope(self.precision):
            controls_ps = psi_to_controls(psi.astype(_real_dtype(self.precision)))
            profile = temporal_profile(self.model, controls_ps, b_integral, self.precision)
            metrics = profile_metrics(self.model, profile, self.fwhm_mode)
            if self.observation == "psi+profile":
                time_ps = jnp.asarray(self.model.time_ps, profile.dtype)
                observed = resampled_profile(time_ps, profile, metrics.peak_time_ps)
            else:
                observed = jnp.zeros((0,), profile.dtype)
            return (
                PulseMetrics(*(jnp.asarray(value).astype(jnp.float32) for value in metrics)),
                observed.astype(jnp.float32),
            )

    def _observe(self, state: LaserState, observed_profile: jax.Array) -> jax.Array:
        parts = [state.psi, observed_profile]
        if self.randomises_b:
            parts.append(state.b_integral[None])
        return jnp.concatenate(parts).astype(jnp.float32)

    def reset(self, key: jax.Array, params: LaserParams) -> tuple[jax.Array, LaserState]:
        """psi0 ~ N(1/2, reset_std²) clipped to the box; B fixed or ~ U(b_low, b_high)."""
        key_psi, key_b = jax.random.split(key)
        noise = jax.random.normal(key_psi, (NUM_CONTROLS,), jnp.float32)
        psi = jnp.clip(0.5 + params.reset_std * noise, 0.0, 1.0).astype(jnp.float32)
        if self.randomises_b:
            b_integral = jax.random.uniform(key_b, (), jnp.float32, params.b_low, params.b_high)
        else:
            b_integral = jnp.asarray(params.b_integral, jnp.float32)
        state = LaserState(psi=psi, b_integral=b_integral, step=jnp.zeros((), jnp.int32))
        if self.observation == "psi+profile":
            _, observed = self.evaluate(psi, b_integral)
        else:
            observed = jnp.zeros((0,), jnp.float32)
        return self._observe(state, observed), state

    def step(self, key: jax.Array, state: LaserState, action: jax.Array, params: LaserParams) -> StepResult:
        """One v2 step (deterministic; ``key`` is unused)."""
        del key
        action = jnp.clip(jnp.asarray(action, jnp.float32).reshape(NUM_CONTROLS), -1.0, 1.0)
        psi = jnp.clip(state.psi + params.action_scale * action, 0.0, 1.0).astype(jnp.float32)
        step = state.step + 1
        metrics, observed = self.evaluate(psi, state.b_integral)
        terminated = metrics.fwhm_ps >= params.max_fwhm_ps
        truncated = jnp.logical_and(step >= params.max_steps, jnp.logical_not(terminated))
        reward = v2_reward(metrics.fwhm_ps, metrics.peak_intensity_ratio, terminated, params)
        new_state = LaserState(psi=psi, b_integral=state.b_integral, step=step)
        info = {
            "fwhm_ps": metrics.fwhm_ps,
            "peak_intensity_ratio": metrics.peak_intensity_ratio,
            "peak_intensity_tw_m2": metrics.peak_intensity_tw_m2,
            "l1_regret": metrics.l1_regret,
            "b_integral": state.b_integral,
            "fwhm_exceeded": terminated,
            "step_cap_reached": step >= params.max_steps,
        }
        return StepResult(
            obs=self._observe(new_state, observed),
            state=new_state,
            reward=jnp.asarray(reward, jnp.float32),
            terminated=terminated,
            truncated=truncated,
            info=info,
        )

    def observation_space(self, params: LaserParams) -> gym.spaces.Box:
        """Box over [0, 1] for psi and the profile, [b_low, b_high] for an observed B."""
        size = NUM_CONTROLS + (PROFILE_BINS if self.observation == "psi+profile" else 0)
        low, high = [0.0] * size, [1.0] * size
        if self.randomises_b:
            low.append(float(params.b_low))
            high.append(float(params.b_high))
        return gym.spaces.Box(np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32)

    def action_space(self, params: LaserParams) -> gym.spaces.Box:
        """Box(-1, 1, (3,)): one unit moves psi by ``action_scale``."""
        return gym.spaces.Box(-1.0, 1.0, (NUM_CONTROLS,), np.float32)


def make_laser_env(
    *,
    data_dir: str | Path | None = None,
    gain_mapping: GainMapping = "reference",
    observation: ObservationMode = "psi",
    b_range: tuple[float, float] | None = None,
    precision: Precision = "float64",
    fwhm_mode: FwhmMode = "linear",
    **param_overrides: Any,
) -> gym.Env:
    """Gymnasium face of :class:`LaserPulseCore` (registered as ``o2o/LaserPulse-v0``).

    Without ``data_dir`` the built-in parametric spectrum and gain are used; with it, the measured
    files in that directory (see :func:`load_measured_spectrum_and_gain`). ``param_overrides`` set
    :class:`LaserParams` fields (e.g. ``b_integral=3.0``, ``max_steps=20``).
    """
    known = {field.name for field in dataclasses.fields(LaserParams)}
    unknown = sorted(set(param_overrides) - known)
    if unknown:
        raise ValueError(f"unknown laser env option(s) {unknown}; LaserParams fields are {sorted(known)}")
    if data_dir is None:
        spectral = parametric_spectrum_and_gain()
    else:
        spectral = load_measured_spectrum_and_gain(data_dir, gain_mapping=gain_mapping)
    core = LaserPulseCore(
        build_pulse_model(spectral), observation=observation, b_range=b_range, precision=precision, fwhm_mode=fwhm_mode
    )
    params = core.default_params().replace(**param_overrides)
    return GymnasiumFace(core, params)
