"""How the core reaches serve/, train/ and evals/ without importing them.

Each is named in pyproject.toml under `[project.entry-points."flywheel.plugins"]`, so the
import direction stays `serve -> ray_app` and `train -> evals -> ray_app`.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ray_app.errors import ConfigError


def load_plugin(name: str) -> Callable[..., Any]:
    found = entry_points(group="flywheel.plugins", name=name)
    if not found:
        raise ConfigError(f"plugin {name!r} is not installed (is the project installed with `make setup`?)")
    return next(iter(found)).load()
