"""The persistent compilation cache: where it lives, who decides, and that cached programs give
the numbers a fresh compilation gives."""

from pathlib import Path

import jax
import jaxlib
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from experiments.bench_updates import benchmark_agent, random_transitions
from rl import compilation_cache
from rl.data import replay
from rl.update import compile_updates

CACHE_SETTINGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_compilation_cache_max_size",
)


@pytest.fixture
def own_jax_cache_settings():
    """Let a test change JAX's cache settings; the test session's come back afterwards."""
    saved = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_compilation_cache.reset_cache()


def test_default_directory_follows_the_environment(tmp_path):
    version_and_host = f"jaxlib-{jaxlib.__version__}-{compilation_cache.host_fingerprint()}"
    named = compilation_cache.default_cache_dir({"O2O_COMPILATION_CACHE": str(tmp_path / "mine")})
    assert named == tmp_path / "mine" / version_and_host
    xdg = compilation_cache.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert xdg == tmp_path / "xdg" / "o2o" / "xla" / version_and_host
    assert compilation_cache.default_cache_dir({}) == Path.home() / ".cache" / "o2o" / "xla" / version_and_host
    for off in ("off", "0", "False", "", " none "):
        assert compilation_cache.default_cache_dir({"O2O_COMPILATION_CACHE": off}) is None


def test_host_fingerprint_follows_the_cpu_model_and_flags_not_its_clock(tmp_path):
    def fingerprint(model: str, flags: str, mhz: str) -> str:
        path = tmp_path / f"{model}-{flags}-{mhz}"
        path.write_text(f"processor\t: 0\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: other\n")
        return compilation_cache.host_fingerprint(path)

    reference = fingerprint("EPYC", "fpu avx2 avx512f", "2400.0")
    assert len(reference) == 12
    assert fingerprint("EPYC", "fpu avx2 avx512f", "3100.5") == reference
    assert fingerprint("EPYC", "fpu avx2", "2400.0") != reference
    assert fingerprint("Xeon", "fpu avx2 avx512f", "2400.0") != reference


def test_a_cache_directory_the_user_gave_jax_wins(tmp_path, own_jax_cache_settings):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    assert compilation_cache.enable(tmp_path / "o2o") == tmp_path / "users"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
    assert not (tmp_path / "o2o").exists()


def test_cache_turned_off_leaves_jax_without_one(monkeypatch, own_jax_cache_settings):
    monkeypatch.setenv("O2O_COMPILATION_CACHE", "off")
    assert compilation_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_cache_the_user_turned_off_in_jax_stays_off(tmp_path, own_jax_cache_settings):
    jax.config.update("jax_enable_compilation_cache", False)
    assert compilation_cache.enable(tmp_path / "o2o") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_unwritable_directory_warns_and_runs_without_a_cache(tmp_path, own_jax_cache_settings):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="O2O_COMPILATION_CACHE"):
        assert compilation_cache.enable(blocker / "cache") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_an_update_loaded_from_the_cache_gives_the_same_numbers(tmp_path, own_jax_cache_settings):
    """A fresh compilation writes the SAC update to the cache; with JAX's in-memory caches
    cleared, the same program loads from disk and computes bit-identical agents and metrics."""
    assert compilation_cache.enable(tmp_path / "cache", min_compile_seconds=0.0) == tmp_path / "cache"
    jax.clear_caches()
    buffer = replay.from_items(random_transitions(512))

    def updates():
        agent, metrics = compile_updates(3)(benchmark_agent(jax.random.PRNGKey(0)), buffer, jax.random.PRNGKey(1))
        return jax.device_get((agent, metrics))

    events: list[str] = []

    def listen(event: str, **_) -> None:
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        compiled = updates()
        assert "/jax/compilation_cache/cache_misses" in events
        assert any((tmp_path / "cache").iterdir()), "nothing was written to the cache"
        jax.clear_caches()
        events.clear()
        loaded = updates()
        assert "/jax/compilation_cache/cache_hits" in events
    finally:
        jax.monitoring.unregister_event_listener(listen)
    for x, y in zip(jax.tree.leaves(compiled), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_filelock_warns_and_runs_without_a_cache(tmp_path, monkeypatch, own_jax_cache_settings):
    find_spec = compilation_cache.importlib.util.find_spec
    monkeypatch.setattr(compilation_cache.importlib.util, "find_spec",
                        lambda name, *args: None if name == "filelock" else find_spec(name, *args))
    with pytest.warns(UserWarning, match="filelock"):
        assert compilation_cache.enable(tmp_path / "cache") is None
    assert jax.config.jax_compilation_cache_dir is None
