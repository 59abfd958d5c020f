"""Flywheel core: config, schemas, storage, pipeline and CLI. Imports nothing from serve/train/evals."""
__version__ = "0.1.0"
