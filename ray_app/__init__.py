"""Flywheel core: config, schemas, storage, pipeline and CLI. Imports nothing from serve/train/evals.

This file, errors.py and client/ are also the flywheel-client distribution (client/pyproject.toml: the
client installed alone), so they import only the standard library, httpx and orjson; its version is this one.
"""
__version__ = "0.1.0"
