"""Online SAC training speed on o2o's JAX-native environments: training envs stepped on the host
or on the device, next to rejax's SAC (fully jitted) measured in the same run.

Workload, the same for every library: SAC with 2 critics, 256 x 256 MLPs, batch 256, one update
per environment step (UTD 1), Adam 3e-4, tau 0.005, ``--warmup`` uniform-random steps first, a
replay buffer of ``--short`` transitions. Rows:

- ``o2o`` / ``host``: ``rl.loops.train_online`` stepping each seed's gymnasium face on the host
  (one policy call, one env call per seed and one update call per step);
- ``o2o`` / ``device``: the same loop given the env's functional core (``jax_env``), which runs a
  whole stretch of steps (act, env step, buffer add, update) as one compiled call;
- ``rejax`` / ``device``: rejax's ``SAC.train`` (one compiled program per run, seeds batched by
  ``jax.vmap``) on the same functional core behind a gymnax-style adapter (gymnax ends an episode
  with ``done``, so rejax does not bootstrap at truncation; the work per step is the same).

Every row is learning steps per second summed over seeds, between step ``--short`` and step
``--long`` of a run, so compilation, set-up, the warm-up and the final evaluation are left out:
o2o's rate is read from the run's own log (its rows at both steps carry the cumulative
``steps_per_s`` from the loop's start, which gives the time between them), rejax's from two
compiled runs of ``--short`` and ``--long`` steps, ``(long - short) / (time of long run - time of
short run)``, its evaluation callback replaced by a no-op. Each row reports the median of
``--repeats`` measurements, and the rows of one environment and seed count take turns, so a
change in the machine's speed during the run reaches them alike. rejax is compiled with JAX's default threefry lowering, as its users get it.
rejax comes with the ``bench`` extra; without it its rows are reported and skipped.

    python -m experiments.bench_env_loop --out experiments/results/bench_env_loop.csv
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import tyro

from agents.sac import SAC, SACConfig
from envs.registry import env_factory, make_jax
from rl.logging import read_metrics, write_result_record
from rl.loops import OnlineConfig, train_online
from rl.prng import threefry_lowering
from rl.rollouts import JaxEnvSpec, autoreset_step, trace_scope


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the environment-loop benchmark."""

    envs: tuple[str, ...] = ("o2o/OrbitCorrection-v0", "o2o/LaserPulse-v0")
    """JAX-native environment ids."""
    seeds: tuple[int, ...] = (1, 3)
    """Seed counts to measure (seeds 0..n-1 trained together)."""
    libraries: tuple[str, ...] = ("o2o-host", "o2o-device", "rejax")
    """Rows to measure."""
    warmup: int = 500
    """Uniform-random steps before learning starts (at least the batch size: rejax samples its
    first batch without replacement)."""
    short: int = 1_500
    """Step from which the rate is measured (also the replay capacity)."""
    long: int = 4_000
    """Step up to which the rate is measured (the run's length)."""
    repeats: int = 3
    """Measurements per row (the row reports their median rate)."""
    out: Path | None = None
    """CSV path to write (columns ``env,library,mode,seeds,steps_per_s``)."""


SAC_SETTINGS = SACConfig()
"""o2o's SAC defaults: 2 critics, 256 x 256, batch 256, Adam 3e-4, tau 0.005, gamma 0.99."""


def o2o_runner(env_id: str, num_seeds: int, on_device: bool, args: Args) -> Callable[[], float]:
    """A function that trains o2o's SAC for ``args.long`` steps and returns its learning steps
    per second (summed over seeds) between steps ``args.short`` and ``args.long``."""
    make_env = env_factory(env_id, rescale_actions=True)
    probe = make_env()
    jax_env = JaxEnvSpec(*make_jax(env_id)) if on_device else None
    schedule = OnlineConfig(
        total_steps=args.long, warmup_steps=args.warmup, buffer_capacity=args.short,
        eval_interval=args.long, eval_episodes=1, log_interval=math.gcd(args.warmup, args.short, args.long),
    )

    def measure() -> float:
        with tempfile.TemporaryDirectory() as run_dir:
            train_online(
                lambda key: SAC.create(key, probe.observation_space, probe.action_space, SAC_SETTINGS),
                make_env, schedule, list(range(num_seeds)), run_dir, progress=False, jax_env=jax_env,
            )
            # Each row's steps_per_s is steps / seconds since the loop started.
            rates = {row["step"]: row["steps_per_s"] for row in read_metrics(Path(run_dir)) if row["phase"] == "train"}
        seconds = args.long / rates[args.long] - args.short / rates[args.short]
        return num_seeds * (args.long - args.short) / seconds

    return measure


class GymnaxParams(flax.struct.PyTreeNode):
    """gymnax-style environment parameters: the core's, and the episode cap rejax evaluates with."""

    core: Any
    max_steps_in_episode: int = flax.struct.field(pytree_node=False, default=50)


class GymnaxFace:
    """o2o's functional core behind gymnax's interface: ``step`` resets by itself and returns
    ``(obs, state, reward, done, info)``."""

    def __init__(self, core: Any, params: Any) -> None:
        self.core = core
        self.default_params = GymnaxParams(params, int(getattr(params, "max_steps", 50)))

    def reset(self, key: jax.Array, params: GymnaxParams):
        """Reset as the core does."""
        observation, state = self.core.reset(key, params.core)
        return observation.astype(jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: GymnaxParams):
        """Step and reset at episode end (``done`` = terminated or truncated)."""
        result, _ = autoreset_step(self.core, key, state, action, params.core)
        done = jnp.logical_or(result.terminated, result.truncated)
        return result.obs.astype(jnp.float32), result.state, result.reward.astype(jnp.float32), done, {}

    def observation_space(self, params: GymnaxParams):
        """The core's observation space."""
        return self.core.observation_space(params.core)

    def action_space(self, params: GymnaxParams):
        """The core's action space."""
        return self.core.action_space(params.core)


def rejax_runner(env_id: str, num_seeds: int, args: Args) -> Callable[[], float]:
    """A function that times rejax's SAC (same settings), compiled first, for ``args.short`` and
    ``args.long`` steps and returns its learning steps per second summed over seeds."""
    from rejax import SAC as RejaxSAC

    core, params = make_jax(env_id)
    face = GymnaxFace(core, params)

    def seconds(steps: int) -> float:
        algo = RejaxSAC.create(
            env=face, env_params=face.default_params, total_timesteps=steps, eval_freq=steps,
            skip_initial_evaluation=True, num_envs=1, buffer_size=args.short, fill_buffer=args.warmup,
            batch_size=SAC_SETTINGS.batch_size, learning_rate=SAC_SETTINGS.critic_lr, gamma=SAC_SETTINGS.discount,
            polyak=1.0 - SAC_SETTINGS.tau, num_critics=SAC_SETTINGS.num_critics, num_epochs=1,
            agent_kwargs={"activation": "relu"}, hidden_layer_sizes=SAC_SETTINGS.critic_hidden_dims,
        )
        algo = algo.replace(eval_callback=lambda algo, ts, rng: jnp.zeros(()))
        keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
        with trace_scope(core), threefry_lowering(unrolled=False):
            train = jax.jit(jax.vmap(algo.train)).lower(keys).compile()
            start = time.perf_counter()
            jax.block_until_ready(train(keys))
        return time.perf_counter() - start

    def measure() -> float:
        return num_seeds * (args.long - args.short) / max(seconds(args.long) - seconds(args.short), 1e-9)

    return measure


def interleaved_rates(made: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median rate of each row over ``repeats`` measurements, the rows taking turns."""
    rates: dict[str, list[float]] = {name: [] for name in made}
    for _ in range(repeats):
        for name, measure in made.items():
            rates[name].append(measure())
    return {name: statistics.median(values) for name, values in rates.items()}


def runners(env_id: str, num_seeds: int, args: Args) -> dict[str, Callable[[], float]]:
    """The rows' training functions for one environment and seed count."""
    made: dict[str, Callable[[], float]] = {}
    if "o2o-host" in args.libraries:
        made["o2o-host"] = o2o_runner(env_id, num_seeds, on_device=False, args=args)
    if "o2o-device" in args.libraries:
        made["o2o-device"] = o2o_runner(env_id, num_seeds, on_device=True, args=args)
    if "rejax" in args.libraries:
        try:
            made["rejax"] = rejax_runner(env_id, num_seeds, args)
        except ImportError as error:
            print(f"rejax: not installed ({error}); install the bench extra to measure it")
    return made


def main(args: Args) -> list[dict]:
    """Measure every row, print the table and write the CSV."""
    if not args.warmup < args.short < args.long:
        raise ValueError(f"need warmup < short < long, got {args.warmup}, {args.short}, {args.long}")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    rows = []
    for env_id in args.envs:
        for num_seeds in args.seeds:
            for name, rate in interleaved_rates(runners(env_id, num_seeds, args), args.repeats).items():
                library, mode = name.split("-") if name.startswith("o2o") else (name, "device")
                rows.append({"env": env_id, "library": library, "mode": mode, "seeds": num_seeds, "steps_per_s": rate})
                print(f"{env_id:24s} {library:6s} {mode:7s} seeds {num_seeds:2d}: {rate:8.1f} steps/s", flush=True)
    print_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["env", "library", "mode", "seeds", "steps_per_s"])
            writer.writeheader()
            writer.writerows({**r, "steps_per_s": round(r["steps_per_s"], 1)} for r in rows)
        write_result_record(args.out.with_name(f"{args.out.stem}_run.json"), args, ("rejax", "gymnax"))
    return rows


def print_table(rows: list[dict]) -> None:
    """Markdown table with each row's ratio to rejax and to o2o's host loop (same env and seeds)."""
    print("\n| env | library | envs stepped on | seeds | steps/s | × rejax | × o2o host |\n|---|---|---|---|---|---|---|")
    for row in rows:
        same = {(r["library"], r["mode"]): r["steps_per_s"] for r in rows if (r["env"], r["seeds"]) == (row["env"], row["seeds"])}
        ratios = [f"{row['steps_per_s'] / same[key]:.2f}" if key in same else "-" for key in (("rejax", "device"), ("o2o", "host"))]
        print(f"| {row['env']} | {row['library']} | {row['mode']} | {row['seeds']} | {row['steps_per_s']:.1f} | {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
