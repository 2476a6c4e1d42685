"""Named configurations shared by the CLI and the benchmark scripts.

A preset is a JSON file beside this module: a partial ``TrainArgs`` (nested dicts for nested
configs). ``o2o train --preset NAME`` starts from it; flags given after it still win.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the bundled presets."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load(name: str) -> dict[str, Any]:
    """The preset's fields as a nested dict; unknown names list the available ones."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset '{name}'; available: {', '.join(available())}")
    return json.loads(path.read_text())
