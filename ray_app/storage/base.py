"""The three small store interfaces every backend implements.

Like mlflow's tracking store: an abstract contract, an embedded default (SQLite), and
production backends chosen by URI through `ray_app.storage.registry`. One contract test
suite (tests/test_store_contract.py) runs against every backend.

Records and jobs cross this boundary as plain dicts (JSON-compatible), so a backend
never needs to know the pydantic models.
"""
from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

JobDict = dict[str, Any]


class LogStore(ABC):
    """Production interactions, idempotent by record id."""

    uri: str

    @abstractmethod
    def put_many(self, records: Sequence[dict[str, Any]]) -> int:
        """Store records (each with an `id`); ids already present are left alone. Returns how many were new.

        A record the store cannot take (see `record_problem`, or refused by the server) does not
        sink the batch: the others are stored, then RecordsRejected lists the refused ids and why.
        """

    @abstractmethod
    def get(self, record_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def query(self, *, workload_id: str | None = None, client_id: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""

    @abstractmethod
    def export(self, workload_id: str, client_id: str, *, limit: int | None = None,
               batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every record of a workload, oldest first, streamed in pages (no hit ceiling)."""

    @abstractmethod
    def workloads(self) -> list[dict[str, Any]]:
        """[{"workload_id", "client_id", "count"}] sorted by workload_id, client_id."""

    @abstractmethod
    def count(self, workload_id: str, client_id: str) -> int: ...

    @abstractmethod
    def set_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        """Attach feedback to a stored record; False if the id is unknown."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable (naming the URI) if the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass


class JobStore(ABC):
    """Jobs with their stages and results, API keys, and small named documents (ledgers)."""

    uri: str

    @abstractmethod
    def create_job(self, job: JobDict) -> JobDict: ...

    @abstractmethod
    def get_job(self, job_id: str) -> JobDict:
        """Raise NotFound for an unknown id."""

    @abstractmethod
    def list_jobs(self, *, workload_id: str | None = None, client_id: str | None = None,
                  status: str | None = None, limit: int = 100) -> list[JobDict]:
        """Newest first."""

    @abstractmethod
    def update_job(self, job_id: str, mutate: Callable[[JobDict], None]) -> JobDict:
        """Apply `mutate` to the job atomically (no lost updates between processes).

        `mutate` may raise a FlywheelError (Conflict) to abort without writing.
        """

    @abstractmethod
    def delete_job(self, job_id: str) -> None: ...

    @abstractmethod
    def put_api_key(self, key_hash: str, role: str, name: str) -> None: ...

    @abstractmethod
    def get_api_key(self, key_hash: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def get_doc(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        """A small named document (privacy ledger, trigger marks)."""

    @abstractmethod
    def update_doc(self, collection: str, doc_id: str,
                   mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Create-or-update a named document atomically; `mutate` gets {} for a new one."""

    @abstractmethod
    def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, document) for every document of `collection`, sorted by id (registries: tens, not millions)."""

    @abstractmethod
    def ping(self) -> None: ...

    def close(self) -> None:  # noqa: B027
        pass


class AuditStore(ABC):
    """Append-only, hash-chained audit entries."""

    uri: str

    @abstractmethod
    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Chain `event` onto the last entry atomically; return the stored entry."""

    @abstractmethod
    def entries(self, *, start_seq: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Entries in chain order from `start_seq`."""

    @abstractmethod
    def ping(self) -> None: ...

    def close(self) -> None:  # noqa: B027
        pass


def record_problem(record: dict[str, Any]) -> str | None:
    """Why a log store cannot take `record`, or None. Every LogStore applies the same rule."""
    for key in ("id", "workload_id", "client_id"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"{key} must be a non-empty string, got {record.get(key)!r:.60}"
    ts = record.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return f"timestamp must be epoch seconds (a number), got {ts!r:.60}"
    for key in ("workload_type", "service_name", "constitutional_hash"):
        if not isinstance(record.get(key), str | None):
            return f"{key} must be a string, got {record[key]!r:.60}"
    return None


GENESIS_HASH = "0" * 64


def chain_entry(prev: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """The next audit entry: seq, prev_hash and a SHA-256 over all of it (canonical JSON)."""
    entry = {
        "seq": 0 if prev is None else prev["seq"] + 1,
        "prev_hash": GENESIS_HASH if prev is None else prev["hash"],
        "event": event,
    }
    entry["hash"] = entry_hash(entry)
    return entry


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: entry[k] for k in ("seq", "prev_hash", "event")}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
