"""Backends chosen by URI scheme.

`sqlite:///PATH` (the embedded default), `elasticsearch://HOST:PORT` for logs and
`mongodb://HOST:PORT/DB` for jobs and audit. Backends are named by import path so a
client library is imported only when its backend is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ray_app.errors import ConfigError

if TYPE_CHECKING:
    from ray_app.config import Settings
    from ray_app.storage.base import AuditStore, JobStore, LogStore

LOG_STORES = {
    "sqlite": "ray_app.storage.sqlite:SQLiteLogStore",
    "elasticsearch": "ray_app.storage.elastic:ElasticLogStore",
}
JOB_STORES = {
    "sqlite": "ray_app.storage.sqlite:SQLiteJobStore",
    "mongodb": "ray_app.storage.mongo:MongoJobStore",
}
AUDIT_STORES = {
    "sqlite": "ray_app.storage.sqlite:SQLiteAuditStore",
    "mongodb": "ray_app.storage.mongo:MongoAuditStore",
}


def _open(kind: str, table: dict[str, str], uri: str):
    scheme = urlparse(uri).scheme
    target = table.get(scheme)
    if target is None:
        raise ConfigError(f"{kind} URI {uri!r}: unknown scheme {scheme!r}; known: {', '.join(sorted(table))}")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(uri[len("sqlite:///"):] if scheme == "sqlite" else uri)


def open_log_store(settings: Settings) -> LogStore:
    return _open("log store", LOG_STORES, settings.log_store or f"sqlite:///{settings.data_dir / 'logs.db'}")


def open_job_store(settings: Settings) -> JobStore:
    return _open("job store", JOB_STORES, settings.job_store or f"sqlite:///{settings.data_dir / 'jobs.db'}")


def open_audit_store(settings: Settings) -> AuditStore:
    # Audit lives beside the jobs (MongoDB in production), in a file of its own when embedded.
    uri = settings.job_store or f"sqlite:///{settings.data_dir / 'audit.db'}"
    return _open("audit store", AUDIT_STORES, uri)
