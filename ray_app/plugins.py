"""The parts of Flywheel that ray_app must not import directly (serve, train, evals).

They register under the `flywheel.plugins` entry-point group in pyproject.toml; ray_app
looks them up by name at run time, so the import direction stays one way.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ray_app.errors import ConfigError

GROUP = "flywheel.plugins"


def load_plugin(name: str) -> Callable[..., Any]:
    """The object registered as `name` (e.g. "run": train.flywheel_job.run_job)."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=GROUP))) or "none"
        raise ConfigError(f"no flywheel plugin named {name!r} (installed: {known}); run `make setup`")
    return next(iter(found)).load()
