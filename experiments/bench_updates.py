"""SAC gradient updates per second: o2o next to SBX and d3rlpy, measured in the same run.

Workload (the same for every library): observation 17, action 6, 256x256 MLPs, batch 256,
2 critics, uniform sampling from a 100k-transition buffer of random data. Modes:

- ``per-call``: one sample + update per Python call (how an online loop with UTD 1 drives it);
- ``scan``: ``--k`` sample+update steps per call (o2o: ``lax.scan``; SBX: its ``fori_loop``);
- ``vmap``: o2o only, ``--k`` steps per call for N seeds at once, on a leading seed axis;
  updates/s is summed over seeds. o2o runs the seeds as ``rl.update.over_seeds`` chooses (on the
  CPU one seed after another inside the compiled call); library ``o2o-batched`` is the same call
  with the seeds batched by ``jax.vmap``.

Besides the libraries, library ``plain-jax`` (mode ``scan``) is the same update written in bare
``jax.numpy`` (``experiments/plain_jax_sac.py``): what XLA makes of the arithmetic with no framework
in between, so o2o's distance to it is the cost of o2o's abstractions.

o2o compiles JAX's threefry random-number hash unrolled on the CPU (``rl.prng``); the peers and
the bare-JAX reference are compiled with JAX's default rolled loop, as their users get them, and
library ``o2o-rolled-threefry`` (mode ``scan``) is o2o's scanned update compiled that way too, so
the run measures what the lowering alone is worth.

Every cell is compiled and warmed up first; then ``--repeats`` rounds each time every cell for
one window of ``--seconds``, in turn, and a cell reports the median of its windows. Interleaving
the windows means a change in the machine's speed during the run (other jobs, a shared host) hits
every library alike instead of whichever ran at the time.

The same run measures the machine's arithmetic bound for this workload: XLA's FLOP count of one
o2o update (``cost_analysis`` of the compiled program) divided by the measured throughput of
256 x 256 by 256 x 256 float32 matrix products, the largest dense product the update contains; it
is reported as library ``arithmetic-bound`` (mode ``scan``) and every rate's share of it is
printed. Library ``products-only`` (mode ``scan``) runs the update's matrix products alone:
every ``dot`` of o2o's compiled update, in order, on fixed operands as in the bound's product
loop, with nothing else. It is the rate any implementation of these products could reach on
XLA's CPU backend if all other work were free: a target above it needs faster products or fewer
of them. Peers need the ``bench`` extra (``pip install 'o2o[bench]'``); a missing peer is reported
and skipped. Output: a table on stdout and a CSV (``--out``) with columns
``library,mode,seeds,updates_per_s``.

    python -m experiments.bench_updates --out experiments/results/bench_updates_cpu.csv
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import statistics
import time
from pathlib import Path
from typing import Callable

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from agents.sac import SAC, SACConfig
from experiments import plain_jax_sac
from experiments.hlo import compiled_products
from rl.data import replay
from rl.logging import write_result_record
from rl.prng import threefry_lowering
from rl.types import Transition
from rl.update import SeedBatching, compile_updates

OBS_DIM, ACT_DIM, BATCH, BUFFER = 17, 6, 256, 100_000


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the update-throughput benchmark."""

    k: int = 1000
    """Updates per call in scan and vmap modes."""
    seeds: tuple[int, ...] = (1, 4, 16)
    """Seed counts for the vmap mode."""
    seconds: float = 3.0
    """Length of one timed window."""
    repeats: int = 5
    """Rounds of timed windows, one window per cell each (a cell reports its median)."""
    peers: tuple[str, ...] = ("sbx", "d3rlpy")
    """Peer libraries to measure."""
    out: Path | None = None
    """CSV path to write."""


@dataclasses.dataclass
class Cell:
    """One row of the table: ``call`` performs some updates (or products), blocks until they are
    done and returns how many; ``rates`` collects one rate per timed window."""

    library: str
    mode: str
    seeds: int
    call: Callable[[], int]
    rates: list[float] = dataclasses.field(default_factory=list)


def timed_window(call: Callable[[], int], seconds: float) -> float:
    """Work done per second by repeated ``call``s over one window of at least ``seconds``."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += call()
    return done / (time.perf_counter() - start)


def measure_interleaved(cells: list[Cell], seconds: float, repeats: int) -> None:
    """Warm every cell up (compilation included), then ``repeats`` rounds of one window per cell
    in turn; each cell's ``rates`` gets one entry per round."""
    for cell in cells:
        cell.call()
    for round_index in range(repeats):
        for cell in cells:
            cell.rates.append(timed_window(cell.call, seconds))
        print(f"round {round_index + 1}/{repeats}: " + ", ".join(
            f"{cell.library} {cell.mode} x{cell.seeds} {cell.rates[-1]:.5g}" for cell in cells), flush=True)


def random_transitions(count: int, seed: int = 0) -> Transition:
    """Random float32 transitions of the benchmark's shapes."""
    rng = np.random.default_rng(seed)
    return Transition(
        observations=rng.standard_normal((count, OBS_DIM), dtype=np.float32),
        actions=rng.uniform(-1, 1, (count, ACT_DIM)).astype(np.float32),
        rewards=rng.standard_normal(count, dtype=np.float32),
        next_observations=rng.standard_normal((count, OBS_DIM), dtype=np.float32),
        terminated=rng.random(count) < 0.01,
        truncated=np.zeros(count, bool),
    )


def benchmark_agent(key: jax.Array) -> SAC:
    """A fresh o2o SAC agent with the benchmark's spaces and settings."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32)
    return SAC.create(key, observation_space, action_space, SACConfig(batch_size=BATCH))


def o2o_cell(
    data: Transition, mode: str, num_updates: int, num_seeds: int | None, library: str = "o2o",
    seed_batching: SeedBatching = "auto",
) -> Cell:
    """o2o's SAC update, ``num_updates`` per call, unbatched (``num_seeds`` None) or for
    ``num_seeds`` seeds on a seed axis, run as ``seed_batching`` says."""
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds or 1)
    if num_seeds is None:
        state = {"agent": benchmark_agent(keys[0])}
        buffer = replay.from_items(data)
    else:
        state = {"agent": jax.vmap(benchmark_agent)(keys)}
        buffer = jax.vmap(lambda _: replay.from_items(data))(np.arange(num_seeds))
    run = compile_updates(num_updates, seed_axis=num_seeds is not None, seed_batching=seed_batching)
    counter = {"calls": 0}

    def call() -> int:
        counter["calls"] += 1
        key = jax.random.split(jax.random.PRNGKey(counter["calls"]), num_seeds) if num_seeds else jax.random.PRNGKey(counter["calls"])
        state["agent"], metrics = run(state["agent"], buffer, key)
        jax.block_until_ready(metrics)
        return num_updates * (num_seeds or 1)

    return Cell(library, mode, num_seeds or 1, call)


def o2o_cells(args: Args, data: Transition) -> list[Cell]:
    """o2o per-call, scan and vmap cells on the buffer contents ``data``, plus the scanned update
    compiled with JAX's default threefry lowering (library ``o2o-rolled-threefry``) and, for more
    than one seed, the seeds batched by vmap (library ``o2o-batched``)."""
    rolled = with_jax_default_threefry([o2o_cell(data, "scan", args.k, None, library="o2o-rolled-threefry")])
    own = [o2o_cell(data, "per-call", 1, None), o2o_cell(data, "scan", args.k, None)]
    seeds = [o2o_cell(data, "vmap", args.k, count) for count in args.seeds]
    batched = [
        o2o_cell(data, "vmap", args.k, count, library="o2o-batched", seed_batching="vmap") for count in args.seeds if count > 1
    ]
    return rolled + own + seeds + batched


def with_jax_default_threefry(cells: list[Cell]) -> list[Cell]:
    """``cells`` whose every call runs, and so compiles, under JAX's default rolled threefry
    lowering. Every call, not just the first: a jitted function is compiled again on a later call
    whose arguments differ in type from the first call's (a weak type that became a strong one, a
    new shape), and that program must be the rolled one too. Costs a few microseconds per call."""

    def scoped(call: Callable[[], int]) -> Callable[[], int]:
        def call_with_default_lowering() -> int:
            with threefry_lowering(unrolled=False):
                return call()

        return call_with_default_lowering

    return [dataclasses.replace(cell, call=scoped(cell.call)) for cell in cells]


def plain_jax_buffer(count: int, seed: int = 0) -> plain_jax_sac.Buffer:
    """``random_transitions`` as the bare update's float32 device buffer."""
    data = random_transitions(count, seed)
    columns = (data.observations, data.actions, data.rewards, data.next_observations, data.terminated)
    return plain_jax_sac.Buffer(*(jnp.asarray(column, jnp.float32) for column in columns))


def plain_jax_cell(args: Args) -> Cell:
    """The bare-``jax.numpy`` SAC update, ``--k`` steps per scanned call."""
    buffer = plain_jax_buffer(BUFFER)
    state = {"sac": plain_jax_sac.init_state(jax.random.PRNGKey(0), OBS_DIM, ACT_DIM)}
    run = plain_jax_sac.compile_scan(args.k, BATCH)
    counter = {"calls": 0}

    def call() -> int:
        counter["calls"] += 1
        state["sac"], losses = run(state["sac"], buffer, jax.random.PRNGKey(counter["calls"]))
        jax.block_until_ready(losses)
        return args.k

    return Cell("plain-jax", "scan", 1, call)


@functools.cache
def compiled_update() -> jax.stages.Compiled:
    """One o2o SAC update (sample + critic + actor + temperature) as XLA compiles it; compiled once
    per process (the FLOP count and the products-only row both read it)."""
    agent = benchmark_agent(jax.random.PRNGKey(0))
    buffer = replay.from_items(random_transitions(BATCH))
    return compile_updates(1).lower(agent, buffer, jax.random.PRNGKey(0)).compile()


def update_flops() -> float:
    """FLOPs of one o2o SAC update, from XLA's cost model."""
    return compiled_flops(compiled_update())


def compiled_flops(compiled: jax.stages.Compiled) -> float:
    """XLA's FLOP count of a compiled program (older JAX returns the analysis in a list)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def dense_product_cell(width: int = 256, chain: int = 200) -> Cell:
    """Chained (BATCH x width) @ (width x width) float32 products in one jitted loop, the largest
    dense product the update contains; ``call`` returns the FLOPs done (library ``dense``)."""
    product = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, x: (x @ w) * 0.999, x))
    inputs = jnp.ones((BATCH, width), jnp.float32)
    weights = jnp.eye(width, dtype=jnp.float32)

    def call() -> int:
        jax.block_until_ready(product(inputs, weights))
        return chain * 2 * BATCH * width * width

    return Cell("dense", "flops", 1, call)


def products_only_cell(args: Args) -> Cell:
    """The update's matrix products and nothing else: every ``dot`` of o2o's compiled update,
    one after another on fixed random operands as in the bound's product loop, ``--k`` updates'
    worth per call (library ``products-only``). Its rate is what any implementation of these
    products could reach on XLA's CPU backend if sampling, element-wise work, optimisers and copies
    were free. An optimisation barrier keeps XLA from hoisting the fixed products out of the loop; a
    scalar carried from each product into the next keeps them in order."""
    products = compiled_products(compiled_update())
    if not products:
        raise RuntimeError("found no dot in the compiled update's HLO text; has XLA's text format changed?")
    rng = np.random.default_rng(0)
    operands = [(jnp.asarray(rng.standard_normal(p.lhs_shape), jnp.float32), jnp.asarray(rng.standard_normal(p.rhs_shape), jnp.float32))
                for p in products]

    def one_update(_, carry: jax.Array) -> jax.Array:
        for product, (lhs, rhs) in zip(products, operands):
            lhs, rhs, _ = jax.lax.optimization_barrier((lhs, rhs, carry))
            carry = carry + jax.lax.dot_general(lhs, rhs, product.dimension_numbers).reshape(-1)[0] * 1e-30
        return carry

    run = jax.jit(lambda: jax.lax.fori_loop(0, args.k, one_update, jnp.float32(1.0)))

    def call() -> int:
        jax.block_until_ready(run())
        return args.k

    return Cell("products-only", "scan", 1, call)


def arithmetic_bound_row(products: Cell, flops_per_update: float) -> dict:
    """Updates/s the machine's measured dense-product FLOP rate allows for this workload."""
    flops_per_s = statistics.median(products.rates)
    bound = flops_per_s / flops_per_update
    print(f"bound    {flops_per_update / 1e6:.0f} MFLOP per update at {flops_per_s / 1e9:.1f} GFLOP/s: {bound:9.1f} updates/s", flush=True)
    return {"library": "arithmetic-bound", "mode": "scan", "seeds": 1, "updates_per_s": bound}


class _BoxEnv(gym.Env):
    """A do-nothing env with the benchmark's spaces, for peers that need one to build a model."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(OBS_DIM, np.float32), {}

    def step(self, action):
        return np.zeros(OBS_DIM, np.float32), 0.0, False, False, {}


def sbx_cells(args: Args) -> list[Cell]:
    """SBX SAC: ``train(gradient_steps=1)`` per call and ``train(gradient_steps=k)``."""
    from sbx import SAC as SBXSAC

    model = SBXSAC("MlpPolicy", _BoxEnv(), buffer_size=BUFFER, batch_size=BATCH, learning_starts=0,
                   policy_kwargs={"net_arch": [256, 256], "n_critics": 2}, seed=0, verbose=0)
    from stable_baselines3.common.logger import Logger

    # train() records learning rates to the logger; SB3's configure() would also make an empty
    # SB3-<time> directory in the system's temporary directory.
    model.set_logger(Logger(folder=None, output_formats=[]))
    data = random_transitions(BUFFER)
    buffer = model.replay_buffer
    buffer.observations[:, 0] = data.observations
    buffer.next_observations[:, 0] = data.next_observations
    buffer.actions[:, 0] = data.actions
    buffer.rewards[:, 0] = data.rewards
    buffer.dones[:, 0] = data.terminated
    buffer.full = True

    def cell(mode: str, steps: int) -> Cell:
        def call() -> int:
            model.train(gradient_steps=steps, batch_size=BATCH)
            jax.block_until_ready(model.policy.qf_state.params)
            return steps

        return Cell("sbx", mode, 1, call)

    return [cell("per-call", 1), cell("scan", args.k)]


def d3rlpy_cells(args: Args) -> list[Cell]:
    """d3rlpy SAC: one ``update(batch)`` per call (its only mode), CPU torch."""
    import d3rlpy

    data = random_transitions(BUFFER)
    terminals = np.zeros(BUFFER, np.float32)
    terminals[999::1000] = 1.0
    dataset = d3rlpy.dataset.MDPDataset(data.observations, data.actions, data.rewards, terminals)
    algo = d3rlpy.algos.SACConfig(batch_size=BATCH).create(device="cpu:0")
    algo.build_with_dataset(dataset)

    def call() -> int:
        algo.update(dataset.sample_transition_batch(BATCH))
        return 1

    return [Cell("d3rlpy", "per-call", 1, call)]


PEERS = {"sbx": sbx_cells, "d3rlpy": d3rlpy_cells}


def print_table(rows: list[dict]) -> None:
    """The table, with each row's ratio to SBX's best single-seed rate and its share of the
    arithmetic bound when those were measured."""
    sbx_best = max((r["updates_per_s"] for r in rows if r["library"] == "sbx"), default=None)
    bound = next((r["updates_per_s"] for r in rows if r["library"] == "arithmetic-bound"), None)
    print(f"\n{'library':16s} {'mode':9s} {'seeds':>5s} {'updates/s':>11s} {'x SBX best':>10s} {'% of bound':>10s}")
    for row in rows:
        ratio = f"{row['updates_per_s'] / sbx_best:10.2f}" if sbx_best else f"{'-':>10s}"
        share = f"{100 * row['updates_per_s'] / bound:10.1f}" if bound else f"{'-':>10s}"
        print(f"{row['library']:16s} {row['mode']:9s} {row['seeds']:5d} {row['updates_per_s']:11.1f} {ratio} {share}")


def main(args: Args) -> list[dict]:
    """Measure everything, print the table and write the CSV."""
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    products = dense_product_cell()
    cells = [products, products_only_cell(args)] + with_jax_default_threefry([plain_jax_cell(args)])
    cells += o2o_cells(args, random_transitions(BUFFER))
    for name in args.peers:
        try:
            cells += with_jax_default_threefry(PEERS[name](args))
        except ImportError as error:
            print(f"{name}: not installed ({error}); install the bench extra to measure it")
    measure_interleaved(cells, args.seconds, args.repeats)
    rows = [arithmetic_bound_row(products, update_flops())] + [
        {"library": cell.library, "mode": cell.mode, "seeds": cell.seeds, "updates_per_s": statistics.median(cell.rates)}
        for cell in cells if cell is not products
    ]
    print_table(rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["library", "mode", "seeds", "updates_per_s"])
            writer.writeheader()
            writer.writerows({**r, "updates_per_s": round(r["updates_per_s"], 1)} for r in rows)
        peers = ("sbx-rl", "stable-baselines3", "d3rlpy", "rejax", "torch")
        write_result_record(args.out.with_name(f"{args.out.stem}_run.json"), args, peers)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
