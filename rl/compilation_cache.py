"""A persistent cache of compiled XLA programs, shared by the runs on one machine.

Every o2o run compiles its programs anew: a SAC update takes seconds to compile on the CPU, an
offline-to-online run compiles a dozen programs, and a short run spends a good part of its time
compiling (the quickstart's fine-tuning phase 5 of its 13 s). JAX can write each compiled
executable to disk and load it in a later process instead of compiling the same program again (its
persistent compilation cache); :func:`enable` turns that on with o2o's defaults. The ``o2o`` command
calls it; library users call it themselves.

- Directory: ``$O2O_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/o2o/xla`` (``~/.cache``
  when unset), in a subdirectory per jaxlib version and host CPU: XLA's CPU executables are built
  for the instruction set of the machine that compiled them, so machines sharing a home directory
  keep theirs apart. ``O2O_COMPILATION_CACHE=off`` turns the cache off.
- A cache directory the user gave JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) wins and is
  left as it is.
- Programs that took at least ``MIN_COMPILE_SECONDS`` to compile are kept (JAX's default of one
  second would skip most of o2o's), at most ``MAX_BYTES`` in all, the least recently used evicted
  first (JAX's own bounded cache, which locks the directory with ``filelock`` so that concurrent
  processes can share it).

Written as configuration of JAX's cache rather than a cache of o2o's own: the key (the program,
compiler options and XLA flags, JAX and jaxlib versions) and the executable format are JAX's. A
cached program is the executable a fresh compilation builds, so a run's numbers do not depend on
whether its programs came from the cache. The cache is trusted code: keep it in a directory only
you can write to.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import warnings
from pathlib import Path
from typing import Mapping

import jax
import jaxlib
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from rl.host import cpuinfo_lines

ENVIRONMENT_VARIABLE = "O2O_COMPILATION_CACHE"
"""Names the cache directory, or turns the cache off with one of ``OFF_VALUES``."""
OFF_VALUES = frozenset({"", "0", "off", "false", "no", "none"})
MIN_COMPILE_SECONDS = 0.2
"""Programs compiled faster than this are not written to the cache."""
MAX_BYTES = 2 * 1024**3
"""Size cap of the cache directory; the least recently used programs go first."""


def host_fingerprint(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """A short hash of what decides which machine code XLA may emit here: the CPU's architecture,
    model and feature flags (Linux's ``cpuinfo``; elsewhere what ``platform`` reports). Clock
    speeds and other lines that change from moment to moment do not enter it."""
    description = [platform.system(), platform.machine(), platform.processor()]
    description += cpuinfo_lines(("model name", "flags", "Features", "CPU part"), cpuinfo)
    return hashlib.sha256("\n".join(description).encode()).hexdigest()[:12]


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache directory ``environ`` asks for, or None when it turns the cache off: the
    directory named by ``O2O_COMPILATION_CACHE``, else ``o2o/xla`` under ``XDG_CACHE_HOME`` (or
    ``~/.cache``), with a subdirectory for this jaxlib version and host CPU."""
    named = environ.get(ENVIRONMENT_VARIABLE)
    if named is not None and named.strip().lower() in OFF_VALUES:
        return None
    if named is not None:
        root = Path(named).expanduser()
    else:
        cache_home = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(cache_home).expanduser() / "o2o" / "xla"
    return root / f"jaxlib-{jaxlib.__version__}-{host_fingerprint()}"


def enable(directory: str | os.PathLike | None = None, min_compile_seconds: float = MIN_COMPILE_SECONDS,
           max_bytes: int = MAX_BYTES) -> Path | None:
    """Turn JAX's persistent compilation cache on in ``directory`` (default
    :func:`default_cache_dir`) and return the directory in use, or None when the cache is off.

    A directory already set in JAX's configuration (by ``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config``) is kept, with the user's other cache settings, and returned; a cache the user
    turned off in JAX (``JAX_ENABLE_COMPILATION_CACHE=false``) stays off. A directory that cannot
    be created (a read-only home, say) leaves the cache off with a warning. Call it before the
    programs it should cover are compiled; programs compiled earlier in the process stay
    uncached.
    """
    if not jax.config.jax_enable_compilation_cache:
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    path = Path(directory) if directory is not None else default_cache_dir()
    if path is None:
        return None
    if importlib.util.find_spec("filelock") is None:  # JAX's size cap needs it; o2o depends on it
        warnings.warn("compiled programs are not kept between runs: the package filelock is missing", stacklevel=2)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        warnings.warn(f"compiled programs are not kept between runs: cannot create {path} ({error}); "
                      f"set {ENVIRONMENT_VARIABLE} to a writable directory, or to 'off'", stacklevel=2)
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax_compilation_cache.set_cache_dir(str(path))
    jax_compilation_cache.reset_cache()  # let JAX open the new directory on its next compilation
    return path
