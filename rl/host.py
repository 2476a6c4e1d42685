"""The host CPU as Linux describes it, read in one place for the run records and the
compilation cache's per-machine directory."""

from __future__ import annotations

import os
from typing import Iterable


def cpuinfo_lines(prefixes: Iterable[str], cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str]:
    """The lines of the first processor's block of ``cpuinfo`` that start with one of
    ``prefixes``, stripped (that block describes every processor); empty where the file cannot be
    read (not Linux)."""
    prefixes = tuple(prefixes)
    lines: list[str] = []
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip() == "":
                    break
                if line.startswith(prefixes):
                    lines.append(line.strip())
    except OSError:
        pass
    return lines
