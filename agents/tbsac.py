"""Trend-based SAC (TBSAC): SAC whose actor and critic read the state through trend convolutions.

The state is a stack of three equal-length rows, ``[delta x_{t-1}, delta x_t, x_t]`` (the orbit
environment emits it natively; :class:`envs.trend.TrendStack` builds it for any flat Box
observation). Each network reshapes it to a one-channel ``3 x n`` image and applies three parallel
height-3 convolutions (kernel widths 1, 2 and 3, four channels each, valid padding, LeakyReLU);
their channel-major flattened outputs (108 features for n = 10) feed the usual SAC heads. The
actor and the critic own separate extractors; the critic's is shared by its twin Q heads.

Only the networks differ from :class:`agents.sac.SAC`: :class:`TBSAC` subclasses it and overrides
``create``; the critic/actor/temperature updates and ``act`` are SAC's, unchanged.

Known difference from the reference implementation: its temperature loss is
``-mean(alpha * (log pi + H))`` while SAC here minimises ``log(alpha) * (H(pi) - H)``; both move
``log alpha`` in the same direction, the reference's step being scaled by alpha (Adam largely
normalises that scale away).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from agents.sac import SAC, SACConfig
from rl.loops import OnlineConfig
from rl.nets import MLP, Dense, StateActionValue, ensemble, kernel_init

TREND_ROWS = 3
"""Rows of the trend stack: previous change, current change, current value."""


@dataclasses.dataclass(frozen=True)
class TBSACConfig(SACConfig):
    """Hyperparameters of TBSAC (Chen et al. 2023, ``brain/SAC.py``); SAC fields not listed here
    keep the SAC defaults, which already match the reference."""

    actor_hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy MLP after the trend features."""
    critic_hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of each Q head after the trend features (input: features + action)."""
    num_critics: int = 2
    """Twin Q heads sharing one trend extractor."""
    critic_subset_size: int = 2
    """Both heads enter the minimum of the TD target (clipped double Q)."""
    actor_lr: float = 2e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 2e-4
    """Adam learning rate of the critic (extractor and both heads)."""
    temperature_lr: float = 2e-4
    """Adam learning rate of log(alpha)."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha (log alpha starts at 0)."""
    discount: float = 0.99
    """Discount factor gamma."""
    tau: float = 0.005
    """Polyak rate of the target critic."""
    batch_size: int = 256
    """Transitions per gradient step."""
    conv_channels: int = 4
    """Output channels of each trend convolution."""
    kernel_widths: tuple[int, ...] = (1, 2, 3)
    """Widths of the parallel height-3 convolutions (one convolution per width)."""
    leaky_relu_slope: float = 0.01
    """Negative slope of the LeakyReLU after the convolutions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_channels < 1:
            raise ValueError(f"TBSACConfig.conv_channels must be >= 1, got {self.conv_channels}")
        if not self.kernel_widths or min(self.kernel_widths) < 1:
            raise ValueError(f"TBSACConfig.kernel_widths must be positive widths, got {self.kernel_widths!r}")


def tbsac_online_config(**overrides) -> OnlineConfig:
    """The TBSAC training schedule (spec section 3): 20,000 steps, 500 random warm-up steps, a
    3,000-transition FIFO buffer, one gradient step per env step, evaluation (5 deterministic
    episodes) and checkpoint every 1,000 steps. Keyword arguments override fields."""
    schedule = dict(
        total_steps=20_000,
        warmup_steps=500,
        buffer_capacity=3_000,
        updates_per_step=1,
        eval_interval=1_000,
        eval_episodes=5,
        log_interval=1_000,
        checkpoint_interval=1_000,
    )
    return OnlineConfig(**{**schedule, **overrides})


def trend_feature_count(row_length: int, kernel_widths: Sequence[int], channels: int) -> int:
    """Number of features :class:`TrendFeatures` yields for rows of ``row_length`` values."""
    return channels * sum(row_length - width + 1 for width in kernel_widths)


def check_trend_width(observation_dim: int, kernel_widths: Sequence[int]) -> int:
    """Row length of a flat trend stack of ``observation_dim`` values; raise ``ValueError`` unless it
    splits into three rows at least as long as the widest kernel."""
    if observation_dim % TREND_ROWS:
        raise ValueError(
            f"TBSAC needs a trend observation [delta x_(t-1), delta x_t, x_t] whose size is a multiple "
            f"of 3, got {observation_dim}; wrap the env in envs.trend.TrendStack"
        )
    row_length = observation_dim // TREND_ROWS
    if row_length < max(kernel_widths):
        raise ValueError(f"trend rows of length {row_length} are narrower than the widest kernel {max(kernel_widths)}")
    return row_length


class TrendFeatures(nn.Module):
    """Parallel height-3 convolutions over the ``3 x n`` trend image, LeakyReLU, flattened.

    Accepts any leading batch shape ``(..., 3 n)`` and returns ``(..., features)``; each
    convolution's output is flattened channel-major (all positions of channel 0 first), the
    layout of the reference network.
    """

    channels: int = 4
    kernel_widths: Sequence[int] = (1, 2, 3)
    negative_slope: float = 0.01

    @nn.compact
    def __call__(self, observations: jax.Array) -> jax.Array:
        leading = observations.shape[:-1]
        row_length = observations.shape[-1] // TREND_ROWS
        image = observations.reshape(-1, TREND_ROWS, row_length, 1)  # NHWC, one channel
        flattened = []
        for width in self.kernel_widths:
            maps = nn.Conv(self.channels, kernel_size=(TREND_ROWS, width), padding="VALID")(image)
            maps = nn.leaky_relu(maps, self.negative_slope)  # (batch, 1, n - width + 1, channels)
            flattened.append(jnp.moveaxis(maps, -1, 1).reshape(maps.shape[0], -1))
        return jnp.concatenate(flattened, axis=-1).reshape(*leading, -1)


class TrendPolicyHead(nn.Module):
    """Trend features → MLP → mean and clipped log-std of the pre-squash Gaussian.

    The head layers sit at the top level under the names ``GaussianPolicyHead`` uses (``MLP_0``,
    ``Dense_0`` mean, ``Dense_1`` log-std), so SAC's methods that read the policy parameters work.
    """

    hidden_dims: Sequence[int]
    action_dim: int
    channels: int = 4
    kernel_widths: Sequence[int] = (1, 2, 3)
    negative_slope: float = 0.01
    log_std_min: float = -20.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, observations: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = TrendFeatures(self.channels, self.kernel_widths, self.negative_slope, name="trend")(observations)
        hidden = MLP(self.hidden_dims)(features)
        mean = Dense(self.action_dim, kernel_init=kernel_init(False))(hidden)
        log_std = Dense(self.action_dim, kernel_init=kernel_init(False))(hidden)
        return mean, jnp.clip(log_std, self.log_std_min, self.log_std_max)


class TrendCritic(nn.Module):
    """One trend extractor shared by an ensemble of Q heads on [features, action]; returns
    ``(num_critics, ...)`` Q values like SAC's critic ensemble."""

    hidden_dims: Sequence[int]
    num_critics: int = 2
    channels: int = 4
    kernel_widths: Sequence[int] = (1, 2, 3)
    negative_slope: float = 0.01

    @nn.compact
    def __call__(self, observations: jax.Array, actions: jax.Array) -> jax.Array:
        features = TrendFeatures(self.channels, self.kernel_widths, self.negative_slope, name="trend")(observations)
        heads = ensemble(StateActionValue, self.num_critics)(self.hidden_dims, name="heads")
        return heads(features, actions)


def trend_networks(config: TBSACConfig, action_dim: int) -> tuple[TrendPolicyHead, TrendCritic]:
    """The actor and critic modules of TBSAC for ``config``."""
    trend = dict(channels=config.conv_channels, kernel_widths=config.kernel_widths, negative_slope=config.leaky_relu_slope)
    actor = TrendPolicyHead(
        config.actor_hidden_dims, action_dim, log_std_min=config.log_std_min, log_std_max=config.log_std_max, **trend
    )
    critic = TrendCritic(config.critic_hidden_dims, num_critics=config.num_critics, **trend)
    return actor, critic


def _check_plain_options(config: TBSACConfig) -> None:
    """Reject SAC network options the trend networks do not implement (rather than ignore them)."""
    unsupported = {
        "critic_layer_norm": config.critic_layer_norm,
        "actor_layer_norm": config.actor_layer_norm,
        "orthogonal_init": config.orthogonal_init,
        "final_hidden_scale": config.final_hidden_scale != 1.0,
    }
    for name, enabled in unsupported.items():
        if enabled:
            raise ValueError(f"TBSACConfig.{name}={getattr(config, name)!r} is not supported by the trend networks")


class TBSAC(SAC):
    """SAC with trend-convolution actor and critic (see the module docstring); the update and act
    logic is inherited from :class:`agents.sac.SAC`."""

    @classmethod
    def create(
        cls, key: jax.Array, observation_space: gym.Space, action_space: gym.Space, config: TBSACConfig
    ) -> "TBSAC":
        """Check the trend options and widths, then build through SAC's ``create`` (which asks
        :meth:`networks` for the modules)."""
        if not isinstance(config, TBSACConfig):
            raise ValueError(f"TBSAC needs a TBSACConfig, got {type(config).__name__}")
        _check_plain_options(config)
        observation_dim = int(np.prod(observation_space.shape))
        check_trend_width(observation_dim, config.kernel_widths)
        return super().create(key, observation_space, action_space, config)

    @classmethod
    def networks(cls, config: TBSACConfig, action_dim: int):
        """The trend policy and the twin-Q trend critic (see :func:`trend_networks`)."""
        return trend_networks(config, action_dim)
