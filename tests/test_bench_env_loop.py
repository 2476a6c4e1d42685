"""The environment-loop benchmark: its gymnax adapter ends episodes as gymnax does, and a tiny run
measures every row and writes its CSV and run record."""

import csv
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np

from envs.registry import make_jax
from experiments.bench_env_loop import Args, GymnaxFace, main

ORBIT = "o2o/OrbitCorrection-v0"


def test_gymnax_face_resets_by_itself_and_reports_done_at_the_step_cap():
    core, params = make_jax(ORBIT, max_steps=3)
    face = GymnaxFace(core, params)
    env_params = face.default_params
    assert env_params.max_steps_in_episode == 3
    observation, state = face.reset(jax.random.PRNGKey(0), env_params)
    zero = jnp.zeros(face.action_space(env_params).shape)
    dones = []
    for step in range(3):
        observation, state, reward, done, _ = face.step(jax.random.PRNGKey(step + 1), state, zero, env_params)
        dones.append(bool(done))
        assert observation.dtype == jnp.float32 and np.isfinite(float(reward))
    assert dones[-1] and not any(dones[:-1])
    # After the automatic reset the episode starts over: three more steps to the next cap.
    _, state, _, done, _ = face.step(jax.random.PRNGKey(9), state, zero, env_params)
    assert not bool(done)


def test_tiny_run_measures_every_row_and_writes_csv_and_record(tmp_path):
    libraries = ("o2o-host", "o2o-device") + (("rejax",) if importlib.util.find_spec("rejax") else ())
    out = tmp_path / "loop.csv"
    rows = main(Args(envs=(ORBIT,), seeds=(1,), libraries=libraries, warmup=260, short=300, long=340, repeats=1, out=out))
    assert [(r["library"], r["mode"]) for r in rows] == [tuple(name.split("-")) if "-" in name else (name, "device") for name in libraries]
    assert all(r["steps_per_s"] > 0 for r in rows)
    with out.open() as handle:
        assert [row["library"] for row in csv.DictReader(handle)] == [r["library"] for r in rows]
    record = json.loads((tmp_path / "loop_run.json").read_text())
    assert record["config"]["envs"] == [ORBIT] and "rejax" in record["packages"]
