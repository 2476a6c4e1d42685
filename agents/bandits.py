"""Bandit learners for solver parameters: Tsallis-INF, Tsallis-INF-CB and ChebCB.

The three online learners of "Learning to Relax" (Khodak et al., ICLR 2024), with the update rules
of the project specification (``specs/solver_bandit.md``, section 4): each learner picks one of
``num_arms`` arms per round, observes only the loss of that arm (an iteration count ≥ 1) and
updates. Every learner is a ``flax.struct.PyTreeNode`` whose hyperparameters are a frozen config
dataclass held as a static field, with

- ``Learner.create(key, config) -> learner``
- ``learner.act(context, key, deterministic=False) -> arm`` (int32; pure)
- ``learner.update(context, arm, loss) -> (learner, metrics)`` (pure)

so a whole T-round run is one ``lax.scan`` (:func:`run_on_cost_table`) and runs ``vmap``. The
sampling probabilities are a deterministic function of the state, so ``update`` recomputes the
probability of the played arm instead of carrying it from ``act``. The learners keep float64 state
(the Tsallis normaliser is solved to 1e-12) and run inside a scoped ``jax.enable_x64``.

Comparators that need only a full-information cost table (best fixed arm in hindsight, the
per-instance best arm, fixed arms) are here too; the instance-optimal ω of a solver lives with the
solver (``envs.solver.young_omega``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import struct

Normalisation = Literal["exact", "reference"]
LipschitzMode = Literal["reference", "observed"]


def float64_scope():
    """Scoped ``jax.enable_x64(True)`` in which every learner method runs."""
    return jax.enable_x64(True)


def _f64(value: Any) -> jax.Array:
    return jnp.asarray(value, jnp.float64)


class BanditLearner(Protocol):
    """What :func:`run_on_cost_table` needs; contextual RL agents plug in through an adapter with
    this interface (an ``act`` that maps a context to an arm, an ``update`` fed the played loss)."""

    def act(self, context: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """The arm (int32) to play for this context."""
        ...

    def update(self, context: jax.Array, arm: jax.Array, loss: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        """The learner after observing ``loss`` for ``arm``, and a dict of scalar metrics."""
        ...


# --------------------------------------------------------------------------------------------
# Tsallis-INF


@dataclasses.dataclass(frozen=True)
class TsallisINFConfig:
    """Hyperparameters of :class:`TsallisINF` (1/2-Tsallis-INF with η_t = 2/√t)."""

    num_arms: int = 20
    """Number of arms d."""
    normalisation: Normalisation = "exact"
    """"exact": Newton from ``min u − 2/η`` to |Σp − 1| < tolerance, p normalised (recommended);
    "reference": 20 Newton steps from x = −1 and the unnormalised p of the played arm (parity)."""
    reference_newton_steps: int = 20
    """Newton steps of the reference normaliser."""
    exact_tolerance: float = 1e-12
    """Stopping tolerance on |Σp − 1| of the exact normaliser."""
    exact_max_steps: int = 100
    """Cap on Newton steps of the exact normaliser."""

    def __post_init__(self) -> None:
        if self.num_arms < 2:
            raise ValueError(f"num_arms must be >= 2, got {self.num_arms}")
        if self.normalisation not in ("exact", "reference"):
            raise ValueError(f"normalisation must be 'exact' or 'reference', got {self.normalisation!r}")


class TsallisDistribution(NamedTuple):
    """The sampling distribution of one Tsallis-INF round."""

    weights: jax.Array
    """p_i(x) at the final normaliser x (unnormalised)."""
    sampling: jax.Array
    """Probabilities actually sampled from: p/Σp, or uniform when p is invalid."""
    valid: jax.Array
    """Whether p is finite, non-negative and sums to a positive number."""
    normaliser: jax.Array
    """The normaliser x."""
    newton_steps: jax.Array
    """Newton steps taken."""


class TsallisINF(struct.PyTreeNode):
    """Tsallis-INF over a finite arm set with importance-weighted loss estimates (spec 4.1).

    ``u = L̂/s``; ``p_i = 4(η_t(u_i − x))⁻²`` with the normaliser x making Σp = 1; after loss ℓ of
    arm I: ``L̂_I += (ℓ − 1)/p_I``, ``s = mean(ℓ_1..ℓ_t) − 1``, ``t += 1``.
    """

    loss_estimates: jax.Array
    """L̂ ∈ R^d, cumulative importance-weighted (loss − 1) estimates."""
    loss_scale: jax.Array
    """s: mean observed loss − 1 (1 before the first update)."""
    round: jax.Array
    """t, starting at 1."""
    loss_sum: jax.Array
    """Sum of the observed losses."""
    config: TsallisINFConfig = struct.field(pytree_node=False)

    @classmethod
    def create(cls, key: jax.Array, config: TsallisINFConfig = TsallisINFConfig()) -> "TsallisINF":
        """Fresh learner: L̂ = 0, s = 1, t = 1 (``key`` is unused; the learner starts deterministic)."""
        del key
        with float64_scope():
            return cls(jnp.zeros(config.num_arms, jnp.float64), _f64(1.0), jnp.int32(1), _f64(0.0), config)

    def distribution(self) -> TsallisDistribution:
        """Solve for the normaliser x and return the round's distribution."""
        with float64_scope():
            eta = 2.0 / jnp.sqrt(self.round.astype(jnp.float64))
            normalised_losses = self.loss_estimates / self.loss_scale

            def weights(x):
                return 4.0 * (eta * (normalised_losses - x)) ** -2.0

            def newton(x, p):
                return x - (jnp.sum(p) - 1.0) / (eta * jnp.sum(p**1.5))

            if self.config.normalisation == "reference":

                def reference_step(_, carry):
                    x, _, _ = carry
                    p = weights(x)
                    return newton(x, p), x, p

                # The reference samples with the p computed at the start of the last step (at the
                # x that step started from), not with p at the x it produced.
                start = (_f64(-1.0), _f64(-1.0), jnp.zeros_like(normalised_losses))
                _, x, p = jax.lax.fori_loop(0, self.config.reference_newton_steps, reference_step, start)
                steps = jnp.int32(self.config.reference_newton_steps)
            else:

                def unconverged(carry):
                    x, step = carry
                    return jnp.logical_and(jnp.abs(jnp.sum(weights(x)) - 1.0) >= self.config.exact_tolerance, step < self.config.exact_max_steps)

                def exact_step(carry):
                    x, step = carry
                    return newton(x, weights(x)), step + 1

                start = (jnp.min(normalised_losses) - 2.0 / eta, jnp.int32(0))
                x, steps = jax.lax.while_loop(unconverged, exact_step, start)
                p = weights(x)
            total = jnp.sum(p)
            valid = jnp.all(jnp.isfinite(p)) & jnp.all(p >= 0.0) & (total > 0.0)
            uniform = jnp.full_like(p, 1.0 / self.config.num_arms)
            sampling = jnp.where(valid, p / jnp.where(valid, total, 1.0), uniform)
            return TsallisDistribution(p, sampling, valid, x, steps)

    def act(self, context: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Sample an arm (``deterministic``: the most probable one). The context is ignored."""
        del context
        with float64_scope():
            sampling = self.distribution().sampling
            if deterministic:
                return jnp.argmax(sampling).astype(jnp.int32)
            return jax.random.choice(key, self.config.num_arms, p=sampling).astype(jnp.int32)

    def played_probability(self, dist: TsallisDistribution, arm: jax.Array) -> jax.Array:
        """p_I used by the estimator: the sampled probability (exact; 1/d when p is invalid) or the
        unnormalised p_I, kept even when p is invalid (reference)."""
        if self.config.normalisation == "reference":
            return dist.weights[arm]
        return dist.sampling[arm]

    def update(self, context: jax.Array, arm: jax.Array, loss: jax.Array) -> tuple["TsallisINF", dict[str, jax.Array]]:
        """Importance-weighted update with the played arm's loss (an iteration count)."""
        del context
        with float64_scope():
            loss = _f64(loss)
            dist = self.distribution()
            probability = self.played_probability(dist, arm)
            loss_sum = self.loss_sum + loss
            learner = self.replace(
                loss_estimates=self.loss_estimates.at[arm].add((loss - 1.0) / probability),
                loss_scale=loss_sum / self.round.astype(jnp.float64) - 1.0,
                round=self.round + 1,
                loss_sum=loss_sum,
            )
            metrics = {
                "played_probability": probability,
                "probability_sum_error": jnp.abs(jnp.sum(dist.weights) - 1.0),
                "normaliser_gap": jnp.min(self.loss_estimates / self.loss_scale) - dist.normaliser,
                "valid": dist.valid,
                "newton_steps": dist.newton_steps,
            }
            return learner, metrics


# --------------------------------------------------------------------------------------------
# Tsallis-INF-CB


@dataclasses.dataclass(frozen=True)
class TsallisINFCBConfig:
    """Hyperparameters of :class:`TsallisINFCB` (context binning + one Tsallis-INF per bin)."""

    num_bins: int = 5
    """Bins m over [context_low, context_high] (setup A: 5; setup B: 6)."""
    context_low: float = -0.15
    """Lower end a of the context interval."""
    context_high: float = 0.65
    """Upper end b of the context interval."""
    bandit: TsallisINFConfig = TsallisINFConfig()
    """Configuration of every per-bin Tsallis-INF."""

    def __post_init__(self) -> None:
        if self.num_bins < 1 or not self.context_high > self.context_low:
            raise ValueError(f"need num_bins >= 1 and context_high > context_low, got {self}")


class TsallisINFCB(struct.PyTreeNode):
    """Contextual Tsallis-INF by binning (spec 4.2): contexts go to the nearest of m bin centres
    ``a + (b − a)(j − ½)/m``; each bin runs an independent Tsallis-INF; only the chosen bin updates."""

    bins: TsallisINF
    """The per-bin learners, stacked along a leading axis of size num_bins."""
    config: TsallisINFCBConfig = struct.field(pytree_node=False)

    @classmethod
    def create(cls, key: jax.Array, config: TsallisINFCBConfig = TsallisINFCBConfig()) -> "TsallisINFCB":
        """m fresh Tsallis-INF learners."""
        keys = jax.random.split(key, config.num_bins)
        return cls(jax.vmap(lambda k: TsallisINF.create(k, config.bandit))(keys), config)

    def bin_centres(self) -> jax.Array:
        """The m bin centres."""
        with float64_scope():
            low, high, count = self.config.context_low, self.config.context_high, self.config.num_bins
            return low + (high - low) * (jnp.arange(1, count + 1, dtype=jnp.float64) - 0.5) / count

    def bin_of(self, context: jax.Array) -> jax.Array:
        """Index of the nearest bin centre (the first on ties)."""
        with float64_scope():
            return jnp.argmin(jnp.abs(self.bin_centres() - _f64(context).reshape(()))).astype(jnp.int32)

    def _bin(self, index: jax.Array) -> TsallisINF:
        return jax.tree.map(lambda leaf: leaf[index], self.bins)

    def act(self, context: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """The arm sampled by the context's bin."""
        return self._bin(self.bin_of(context)).act(context, key, deterministic)

    def update(self, context: jax.Array, arm: jax.Array, loss: jax.Array) -> tuple["TsallisINFCB", dict[str, jax.Array]]:
        """Update only the context's bin."""
        index = self.bin_of(context)
        updated, metrics = self._bin(index).update(context, arm, loss)
        bins = jax.tree.map(lambda stacked, leaf: stacked.at[index].set(leaf), self.bins, updated)
        return self.replace(bins=bins), {**metrics, "bin": index}


# --------------------------------------------------------------------------------------------
# ChebCB


@dataclasses.dataclass(frozen=True)
class ChebCBConfig:
    """Hyperparameters of :class:`ChebCB` (SquareCB with a Chebyshev regression per arm)."""

    num_arms: int = 20
    """Number of arms d."""
    num_features: int = 6
    """Chebyshev features m (T_0..T_{m−1})."""
    context_low: float = -0.15
    """Lower end a of the context interval."""
    context_high: float = 0.65
    """Upper end b of the context interval."""
    horizon: int = 5000
    """T; the reference Lipschitz estimate depends on it (its loss history has length T)."""
    lipschitz: LipschitzMode = "reference"
    """"reference": min loss = 0 until round T, as the reference code's zero-filled history;
    "observed": min over the observed losses."""
    box_iterations: int = 40
    """Cap on active-set iterations of the box-constrained least squares."""
    eta_cap: float = 1e12
    """η used when the denominator of the η rule is not positive."""

    def __post_init__(self) -> None:
        if self.num_arms < 2 or self.num_features < 1 or self.horizon < 1:
            raise ValueError(f"need num_arms >= 2, num_features >= 1, horizon >= 1, got {self}")
        if not self.context_high > self.context_low:
            raise ValueError(f"context_high must exceed context_low, got {self}")
        if self.lipschitz not in ("reference", "observed"):
            raise ValueError(f"lipschitz must be 'reference' or 'observed', got {self.lipschitz!r}")


def chebyshev_features(context: Any, low: float, high: float, count: int) -> jax.Array:
    """``(T_0(z), …, T_{count−1}(z))`` at ``z = 2(c − low)/(high − low) − 1`` (three-term recurrence)."""
    z = 2.0 * (context - low) / (high - low) - 1.0
    values = [jnp.ones_like(z), z]
    for _ in range(2, count):
        values.append(2.0 * z * values[-1] - values[-2])
    return jnp.stack(values[:count], axis=-1)


def min_norm_lstsq(matrix: jax.Array, target: jax.Array, relative_tolerance: jax.Array) -> jax.Array:
    """Minimum-norm least-squares solution via the SVD, dropping singular values below
    ``relative_tolerance·σ_max`` (``jnp.linalg.lstsq`` takes no per-call traced tolerance)."""
    left, singular, right_t = jnp.linalg.svd(matrix, full_matrices=False)
    keep = singular > relative_tolerance * singular[0]
    inverse = jnp.where(keep, 1.0 / jnp.where(keep, singular, 1.0), 0.0)
    return right_t.T @ (inverse * (left.T @ target))


def box_least_squares(matrix: jax.Array, target: jax.Array, lower: jax.Array, upper: jax.Array, max_iterations: int = 40) -> jax.Array:
    """``argmin ‖A x − b‖²`` subject to ``lower ≤ x ≤ upper`` by a primal active-set method.

    Hand-written because no jittable bounded least-squares solver is in jax/optax (scipy's
    ``lsq_linear`` runs on the host). Starts from the feasible point ``clip(0)``; variables with
    ``lower == upper`` stay pinned. Each iteration solves the free variables by minimum-norm
    least squares; an infeasible solution is approached up to the first blocking bound (which
    becomes active); a feasible one releases the bound with the most violated multiplier, or stops
    when none is violated (the KKT conditions hold). Meant for small dense problems (a few columns).
    """
    num = matrix.shape[1]
    pinned = lower >= upper
    eps = jnp.finfo(matrix.dtype).eps
    tolerance = 64.0 * eps * max(matrix.shape)
    kkt_tolerance = 1e3 * eps * (jnp.linalg.norm(matrix) * jnp.linalg.norm(target) + jnp.linalg.norm(matrix) ** 2 + 1e-300)
    # status: −1 at the lower bound, +1 at the upper bound, 0 free.
    start = (jnp.clip(jnp.zeros(num, matrix.dtype), lower, upper), jnp.where(pinned, -1, 0).astype(jnp.int32), jnp.bool_(False), jnp.int32(0))

    def running(carry):
        _, _, done, iteration = carry
        return jnp.logical_and(~done, iteration < max_iterations)

    def iterate(carry):
        x, status, _, iteration = carry
        free = status == 0
        reduced_target = target - matrix @ jnp.where(free, 0.0, x)
        candidate = jnp.where(free, min_norm_lstsq(matrix * free, reduced_target, tolerance), x)
        below, above = free & (candidate < lower), free & (candidate > upper)
        feasible = ~jnp.any(below | above)
        # Feasible: release the most violated bound (gradient pointing into the box), if any.
        descent = matrix.T @ (target - matrix @ candidate)
        violation = jnp.where(~pinned & (status == -1), descent, jnp.where(status == 1, -descent, -jnp.inf))
        release = jnp.argmax(violation)
        releasing = violation[release] > kkt_tolerance
        released_status = jnp.where(releasing & (jnp.arange(num) == release), 0, status)
        # Infeasible: move towards the candidate until the first bound blocks.
        direction = candidate - x
        safe = jnp.where(direction == 0.0, 1.0, direction)
        ratio = jnp.where(below, (lower - x) / safe, jnp.where(above, (upper - x) / safe, jnp.inf))
        step = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        blocked = (below | above) & (ratio <= step + tolerance)
        stepped = jnp.where(blocked, jnp.where(below, lower, upper), jnp.clip(x + step * direction, lower, upper))
        stepped_status = jnp.where(blocked, jnp.where(below, -1, 1), status)
        return (
            jnp.where(feasible, candidate, stepped),
            jnp.where(feasible, released_status, stepped_status),
            feasible & ~releasing,
            iteration + 1,
        )

    solution, _, _, _ = jax.lax.while_loop(running, iterate, start)
    return solution


class ChebCBFit(NamedTuple):
    """Coefficients of one arm's refit, whether the box constraint was needed, and its residual."""

    theta: jax.Array
    constrained: jax.Array
    resnorm: jax.Array


class ChebCB(struct.PyTreeNode):
    """ChebCB (spec 4.3): per-arm Chebyshev regression of the scaled loss on the context, and
    inverse-gap-weighted exploration around the predicted best arm with a data-driven η.

    Instead of storing every round's features and losses, each arm keeps the R factor of the QR
    decomposition of its feature rows and ``Qᵀ(ℓ − 1)``: the same least-squares problems in O(m²)
    memory (``‖Φθ − y‖² = ‖Rθ − Qᵀy‖² + ‖y‖² − ‖Qᵀy‖²``, and Φ and R share singular values).
    """

    theta: jax.Array
    """(d, m) coefficients of the scaled losses (ℓ − 1)/scale."""
    r_factor: jax.Array
    """(d, m, m) R factor of each arm's feature rows (zero before any play)."""
    projected_targets: jax.Array
    """(d, m) Qᵀ(ℓ − 1) of each arm's rounds."""
    target_sq: jax.Array
    """(d,) Σ (ℓ − 1)² of each arm's rounds."""
    counts: jax.Array
    """(d,) plays per arm."""
    eta: jax.Array
    """Exploration parameter η (0 before the first update: uniform play)."""
    scale: jax.Array
    """Loss scale K·N (0 before the first update)."""
    round: jax.Array
    """t, starting at 1."""
    loss_max: jax.Array
    loss_min: jax.Array
    prediction_sq_sum: jax.Array
    """Σ pred_s² (pred_s: the played arm's prediction at its round)."""
    prediction_loss_sum: jax.Array
    """Σ pred_s ℓ_s."""
    loss_sq_sum: jax.Array
    """Σ ℓ_s²; with the two sums above gives R = Σ (pred_s − ℓ_s/scale)² for any scale."""
    config: ChebCBConfig = struct.field(pytree_node=False)

    @classmethod
    def create(cls, key: jax.Array, config: ChebCBConfig = ChebCBConfig()) -> "ChebCB":
        """θ = 0, η = 0, scale = 0 (``key`` is unused)."""
        del key
        d, m = config.num_arms, config.num_features
        with float64_scope():
            zero = _f64(0.0)
            return cls(
                theta=jnp.zeros((d, m), jnp.float64),
                r_factor=jnp.zeros((d, m, m), jnp.float64),
                projected_targets=jnp.zeros((d, m), jnp.float64),
                target_sq=jnp.zeros(d, jnp.float64),
                counts=jnp.zeros(d, jnp.int32),
                eta=zero,
                scale=zero,
                round=jnp.int32(1),
                loss_max=_f64(-jnp.inf),
                loss_min=_f64(jnp.inf),
                prediction_sq_sum=zero,
                prediction_loss_sum=zero,
                loss_sq_sum=zero,
                config=config,
            )

    def features(self, context: jax.Array) -> jax.Array:
        """Chebyshev features φ(c) of a context."""
        with float64_scope():
            cfg = self.config
            return chebyshev_features(_f64(context).reshape(()), cfg.context_low, cfg.context_high, cfg.num_features)

    def predictions(self, context: jax.Array) -> jax.Array:
        """ŷ = θ φ(c), one scaled loss prediction per arm."""
        with float64_scope():
            return self.theta @ self.features(context)

    def probabilities(self, context: jax.Array) -> jax.Array:
        """Inverse-gap weighting: ``p_i = 1/(d + η(ŷ_i − ŷ_{i*}))`` for i ≠ i*, the rest on i*."""
        with float64_scope():
            predicted = self.predictions(context)
            best = jnp.argmin(predicted)
            others = 1.0 / (self.config.num_arms + self.eta * (predicted - predicted[best]))
            others = others.at[best].set(0.0)
            return others.at[best].set(1.0 - jnp.sum(others))

    def act(self, context: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """Sample an arm (``deterministic``: the predicted best arm)."""
        with float64_scope():
            if deterministic:
                return jnp.argmin(self.predictions(context)).astype(jnp.int32)
            return jax.random.choice(key, self.config.num_arms, p=self.probabilities(context)).astype(jnp.int32)

    def _fit(self, r_factor, projected, target_sq, count, upper, scale) -> ChebCBFit:
        """Minimum-norm least squares of one arm; refit inside the box [−upper, upper] if it leaves it."""
        m = self.config.num_features
        target = projected / scale
        tolerance = jnp.maximum(count, m).astype(jnp.float64) * jnp.finfo(jnp.float64).eps
        unconstrained = min_norm_lstsq(r_factor, target, tolerance)
        constrained = jnp.any(jnp.abs(unconstrained) > upper)
        boxed = jax.lax.cond(
            constrained,
            lambda: box_least_squares(r_factor, target, -upper, upper, self.config.box_iterations),
            lambda: unconstrained,
        )
        orthogonal_residual = jnp.maximum(target_sq - jnp.sum(projected**2), 0.0) / scale**2
        resnorm = jnp.sum((r_factor @ boxed - target) ** 2) + orthogonal_residual
        return ChebCBFit(jnp.where(constrained, boxed, unconstrained), constrained, resnorm)

    def update(self, context: jax.Array, arm: jax.Array, loss: jax.Array) -> tuple["ChebCB", dict[str, jax.Array]]:
        """Add the round to the played arm's regression, refit, and set the new η (spec 4.3)."""
        cfg = self.config
        d, m = cfg.num_arms, cfg.num_features
        width = cfg.context_high - cfg.context_low
        with float64_scope():
            loss = _f64(loss)
            features = self.features(context)
            prediction = self.theta[arm] @ features
            t = self.round.astype(jnp.float64)
            loss_max = jnp.maximum(self.loss_max, loss)
            loss_min = jnp.minimum(self.loss_min, loss)
            if cfg.lipschitz == "reference":
                loss_min_for_lipschitz = jnp.where(self.round >= cfg.horizon, loss_min, jnp.minimum(loss_min, 0.0))
            else:
                loss_min_for_lipschitz = loss_min
            lipschitz = (loss_max - loss_min_for_lipschitz) / width
            n_factor = 2.0 + 4.0 * width * lipschitz / loss_max * (1.0 + math.log(m))
            scale = loss_max * n_factor
            changed = self.scale != scale
            upper = jnp.concatenate([(1.0 / n_factor)[None], 2.0 * width * lipschitz / scale / jnp.arange(1, m, dtype=jnp.float64)])

            # Append the round to the played arm's QR factorisation.
            stacked = jnp.concatenate([self.r_factor[arm], features[None, :]])
            q, r = jnp.linalg.qr(stacked)
            projected = q.T @ jnp.concatenate([self.projected_targets[arm], (loss - 1.0)[None]])
            r_factor = self.r_factor.at[arm].set(r)
            projected_targets = self.projected_targets.at[arm].set(projected)
            target_sq = self.target_sq.at[arm].add((loss - 1.0) ** 2)
            counts = self.counts.at[arm].add(1)

            def refit_all():
                fits = jax.vmap(lambda *args: self._fit(*args, upper, scale))(r_factor, projected_targets, target_sq, counts)
                refit = counts > 0
                theta = jnp.where(refit[:, None], fits.theta, self.theta)
                boxed = refit & fits.constrained
                last_boxed = d - 1 - jnp.argmax(boxed[::-1])  # the loop's last constrained fit wins
                return theta, jnp.where(jnp.any(boxed), fits.resnorm[last_boxed], 0.0)

            def refit_played():
                fit = self._fit(r_factor[arm], projected_targets[arm], target_sq[arm], counts[arm], upper, scale)
                return self.theta.at[arm].set(fit.theta), jnp.where(fit.constrained, fit.resnorm, 0.0)

            theta, resnorm = jax.lax.cond(changed, refit_all, refit_played)

            alpha = (math.pi + 2.0 / math.pi * math.log(2 * m + 1)) / (2.0 * scale * (m + 1)) * width * lipschitz
            prediction_sq_sum = self.prediction_sq_sum + prediction**2
            prediction_loss_sum = self.prediction_loss_sum + prediction * loss
            loss_sq_sum = self.loss_sq_sum + loss**2
            squared_error = prediction_sq_sum - 2.0 * prediction_loss_sum / scale + loss_sq_sum / scale**2
            denominator = squared_error - resnorm + 2.0 * alpha**2 * t
            eta = jnp.where(denominator > 0.0, 2.0 * t * jnp.sqrt(d * t / jnp.where(denominator > 0.0, denominator, 1.0)), cfg.eta_cap)

            learner = self.replace(
                theta=theta,
                r_factor=r_factor,
                projected_targets=projected_targets,
                target_sq=target_sq,
                counts=counts,
                eta=eta,
                scale=scale,
                round=self.round + 1,
                loss_max=loss_max,
                loss_min=loss_min,
                prediction_sq_sum=prediction_sq_sum,
                prediction_loss_sum=prediction_loss_sum,
                loss_sq_sum=loss_sq_sum,
            )
            metrics = {
                "eta": eta,
                "scale": scale,
                "n_factor": n_factor,
                "resnorm": resnorm,
                "squared_error": squared_error,
                "alpha": alpha,
                "prediction": prediction,
                "refit_all": changed,
            }
            return learner, metrics


# --------------------------------------------------------------------------------------------
# Running learners on full-information cost tables, and comparators


class RunResult(NamedTuple):
    """Per-round arms and costs of one run (leading run axes under ``vmap``)."""

    arms: jax.Array
    costs: jax.Array
    metrics: dict[str, jax.Array]


def run_on_cost_table(learner: Any, contexts: jax.Array, cost_table: jax.Array, key: jax.Array) -> tuple[Any, RunResult]:
    """Play ``learner`` for T rounds with bandit feedback from a precomputed cost table (one ``lax.scan``).

    ``contexts`` (T,), ``cost_table`` (T, num_arms): round t shows ``contexts[t]``, the learner picks
    arm a and is charged ``cost_table[t, a]`` (the only loss it sees). Jittable and vmappable over
    runs. Any learner with the :class:`BanditLearner` interface works.
    """

    def play(carry, round_inputs):
        learner, key = carry
        context, costs = round_inputs
        key, act_key = jax.random.split(key)
        arm = learner.act(context, act_key)
        cost = costs[arm]
        learner, metrics = learner.update(context, arm, cost)
        return (learner, key), (arm, cost, metrics)

    (learner, _), (arms, costs, metrics) = jax.lax.scan(play, (learner, key), (contexts, cost_table))
    return learner, RunResult(arms, costs, metrics)


def fixed_arm_costs(cost_table: Any, arm: int) -> Any:
    """Per-round costs of always playing ``arm``."""
    return cost_table[..., arm]


def best_fixed_arm(cost_table: Any) -> tuple[Any, Any]:
    """Best fixed arm in hindsight: ``(arm, per-round costs)`` minimising the total over the rounds."""
    arm = jnp.argmin(jnp.sum(jnp.asarray(cost_table), axis=-2), axis=-1)
    return arm, jnp.take_along_axis(jnp.asarray(cost_table), arm[..., None, None], axis=-1)[..., 0]


def per_instance_best_costs(cost_table: Any) -> Any:
    """Oracle over the arm grid: the cheapest arm of every round."""
    return jnp.min(jnp.asarray(cost_table), axis=-1)
