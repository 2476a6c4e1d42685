"""Where the time of one o2o SAC update goes: XLA ops by kind, and products by operand layout.

Companion to ``experiments/bench_updates.py`` (same workload: observation 17, action 6, 256x256,
batch 256, 2 critics). Two tables:

1. **Ops of the scanned update.** ``--k`` scanned updates are traced with ``jax.profiler``
   (Perfetto trace); every traced op is matched to its instruction in the compiled HLO and its
   time is summed per update under one of four kinds: ``forward product`` (a dot, or a library
   fusion of one, that is not a gradient), ``gradient product`` (a dot under ``transpose(...)`` in
   its op name: weight and input gradients), ``random numbers`` (threefry hashing and the
   conversion of its bits, for sampling and the policy's noise: fused ops, or whole loops under
   JAX's default rolled CPU lowering) and ``other`` (element-wise and reduction fusions, copies,
   gathers, the optimiser). Ops run concurrently on the CPU threads and the profiler adds
   overhead, so the sum is op time, not wall time; both are printed.
2. **Products in isolation.** The update's products timed alone in the three layouts a dense
   layer's step uses: forward ``x @ W``, input gradient ``g @ W.T`` and weight gradient
   ``x.T @ g`` (autodiff's), and the weight gradient once more as ``rl.nets.dense_product``
   forms it for a thin layer, ``(g.T @ x).T``. On XLA's CPU backend autodiff's weight-gradient
   layout is slower for the same FLOPs, and for the 6-wide policy head many times slower; that is
   why o2o's dense layers carry their own backward pass. What remains slow, with the element-wise
   work, is the gap between ``bench_updates``' arithmetic bound and any JAX SAC update.

    python -m experiments.profile_update
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from experiments.bench_updates import ACT_DIM, BATCH, BUFFER, benchmark_agent, random_transitions
from experiments.hlo import Instruction, parse_hlo
from rl.data import replay
from rl.nets import dense_product
from rl.update import compile_updates

KINDS = ("forward product", "gradient product", "random numbers", "other")


@dataclasses.dataclass(frozen=True)
class Args:
    """Options of the update profile."""

    k: int = 200
    """Scanned updates traced."""
    top: int = 15
    """Largest ops listed."""
    repeats: int = 500
    """Products per timing in the isolated-product table."""


def kind_of(instruction: Instruction) -> str:
    """One of ``KINDS`` for an instruction."""
    is_product = instruction.opcode == "dot" or (
        instruction.library_fusion and instruction.op_name.endswith("dot_general"))
    if is_product:
        return "gradient product" if "transpose(" in instruction.op_name else "forward product"
    if re.search(r"threefry|jit\(_(?:uniform|randint|normal)", instruction.op_name):
        return "random numbers"
    return "other"


def outermost_op_times(events: Iterable[dict], instructions: dict[str, Instruction]) -> dict[str, float]:
    """Total duration (trace units) per HLO op, counting only ops not nested inside another traced
    op on the same thread, so a loop's body is counted once, as part of the loop."""
    by_thread = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and event["name"] in instructions:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    totals: dict[str, float] = collections.defaultdict(float)
    for thread_events in by_thread.values():
        open_until = -np.inf
        for event in sorted(thread_events, key=lambda e: (e["ts"], -e["dur"])):
            if event["ts"] < open_until:
                continue
            totals[event["name"]] += event["dur"]
            open_until = event["ts"] + event["dur"]
    return dict(totals)


def profile_ops(args: Args) -> tuple[dict[str, float], dict[str, Instruction], float, float]:
    """Per-update op times (microseconds) of o2o's scanned update, its instructions, and the wall
    time per update with and without the profiler."""
    agent, buffer = benchmark_agent(jax.random.PRNGKey(0)), replay.from_items(random_transitions(BUFFER))
    # One compilation, both traced and parsed, so the trace's op names are this program's.
    run = compile_updates(args.k).lower(agent, buffer, jax.random.PRNGKey(0)).compile()
    instructions = parse_hlo(run.as_text())

    def timed_call(seed: int) -> float:
        nonlocal agent
        start = time.perf_counter()
        agent, metrics = run(agent, buffer, jax.random.PRNGKey(seed))
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / args.k * 1e6

    timed_call(1)  # warm up
    plain_wall = min(timed_call(seed) for seed in (2, 3, 4))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            profiled_wall = timed_call(5)
        trace_file = next(Path(trace_dir).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace_file))["traceEvents"]
    per_update = {name: total / args.k for name, total in outermost_op_times(events, instructions).items()}
    return per_update, instructions, plain_wall, profiled_wall


def print_op_table(per_update: dict[str, float], instructions: dict[str, Instruction],
                   plain_wall: float, profiled_wall: float, top: int) -> None:
    """Op time per kind, wall times, and the largest ops."""
    by_kind = collections.Counter({kind: 0.0 for kind in KINDS})
    for name, micros in per_update.items():
        by_kind[kind_of(instructions[name])] += micros
    total = sum(by_kind.values())
    print("\nops of one scanned update (microseconds per update)")
    print(f"{'kind':18s} {'op time':>9s} {'share':>7s}")
    for kind in KINDS:
        print(f"{kind:18s} {by_kind[kind]:9.1f} {100 * by_kind[kind] / total:6.1f}%")
    print(f"{'all ops':18s} {total:9.1f}")
    print(f"wall time per update: {profiled_wall:.1f} profiled, {plain_wall:.1f} without the profiler")
    print(f"\n{'op':32s} {'us':>7s}  {'kind':16s} {'shape':24s} op name")
    for name, micros in sorted(per_update.items(), key=lambda item: -item[1])[:top]:
        instruction = instructions[name]
        op_name = instruction.op_name.removeprefix("jit(run)/while/body/closed_call/")
        kind = kind_of(instruction)
        print(f"{name:32s} {micros:7.1f}  {kind:16s} {instruction.shape[:24]:24s} {op_name[-60:]}")


def product_time(product: Callable[[jax.Array, jax.Array], jax.Array], lhs: jax.Array, rhs: jax.Array,
                 repeats: int) -> float:
    """Microseconds per ``product(lhs, rhs)`` in a jitted loop; both operands are rescaled by the
    previous product's output, so XLA can neither hoist work on either out of the loop nor overlap
    two products (in an update no operand of a product is loop-invariant either)."""

    def body(_, scale):
        return 1.0 + product(lhs * scale, rhs * scale).reshape(-1)[0] * 1e-30

    loop = jax.jit(lambda: jax.lax.fori_loop(0, repeats, body, jnp.float32(1.0)))
    jax.block_until_ready(loop())
    start = time.perf_counter()
    jax.block_until_ready(loop())
    return (time.perf_counter() - start) / repeats * 1e6


LAYOUTS = ("x @ W", "g @ W.T", "x.T @ g", "o2o's dW")
"""Column names: forward, input gradient, autodiff's weight gradient, and the weight gradient as
``rl.nets.dense_product`` computes it (``(g.T @ x).T`` for a thin layer)."""


def _dense_product_weight_gradient(inputs: jax.Array, grads: jax.Array) -> jax.Array:
    """The weight gradient of ``rl.nets.dense_product`` (its own backward pass, vmapped over any
    leading ensemble axis as in the critics); for a thin layer that is ``(g.T @ x).T``."""

    def one_layer(layer_inputs: jax.Array, layer_grads: jax.Array) -> jax.Array:
        kernel = jnp.zeros((layer_inputs.shape[-1], layer_grads.shape[-1]), layer_inputs.dtype)
        return jax.vjp(lambda weights: dense_product(layer_inputs, weights), kernel)[1](layer_grads)[0]

    for _ in range(inputs.ndim - 2):
        one_layer = jax.vmap(one_layer)
    return one_layer(inputs, grads)


def product_layout_rows(repeats: int) -> list[tuple[str, list[float]]]:
    """(layer, microseconds per ``LAYOUTS`` column) for the update's main products: one 256->256
    layer, both critics' 256->256 layers at once, and the 256->6 policy head."""
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def einsum(spec: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda lhs, rhs: jnp.einsum(spec, lhs, rhs)

    rows = []
    for label, critics, width_out in (("256 -> 256", 0, 256), ("2 critics, 256 -> 256", 2, 256),
                                      ("256 -> 6 (policy head)", 0, ACT_DIM)):
        lead = (critics,) if critics else ()
        inputs, grads = normal(*lead, BATCH, 256), normal(*lead, BATCH, width_out)
        weights = normal(*lead, 256, width_out)
        cases = ((einsum("...bi,...io->...bo"), inputs, weights),
                 (einsum("...bo,...io->...bi"), grads, weights),
                 (einsum("...bi,...bo->...io"), inputs, grads),
                 (_dense_product_weight_gradient, inputs, grads))
        rows.append((label, [product_time(product, lhs, rhs, repeats) for product, lhs, rhs in cases]))
    return rows


def print_layout_table(rows: list[tuple[str, list[float]]]) -> None:
    """The isolated-product table, with the weight gradient's time relative to the forward product."""
    print(f"\nproducts alone, batch {BATCH} (microseconds)")
    print(f"{'layer':24s}" + "".join(f" {name:>14s}" for name in LAYOUTS))
    for label, times in rows:
        cells = "".join(f" {time_:14.1f}" for time_ in times)
        print(f"{label:24s}{cells}  (weight gradient {times[2] / times[0]:.2f}x forward)")


def main(args: Args) -> None:
    """Profile the update and time the products."""
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    print_op_table(*profile_ops(args), args.top)
    print_layout_table(product_layout_rows(args.repeats))


if __name__ == "__main__":
    main(tyro.cli(Args))
