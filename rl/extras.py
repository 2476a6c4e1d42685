"""Optional extras: import a module that only an extra installs, or say which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(RuntimeError):
    """A feature was asked for whose optional dependency is not installed."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if it is missing, raise :class:`MissingExtra` naming ``feature`` and the
    ``pip install 'o2o[extra]'`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{feature} needs the {extra} extra: pip install 'o2o[{extra}]'") from error
