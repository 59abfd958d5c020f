"""`flywheel load`: stream a JSONL file into the log store with bounded memory.

Lines go through the same door as HTTP ingest (validation, PII scrubbing, hash
stamping) and are written a batch at a time, so a 100k-line file needs no
more memory than one batch. Both blueprint formats load: whole log records, and plain
`{"messages": [...], "tools": [...]}` lines (which need --workload-id / --client-id).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ray_app.config import Settings
from ray_app.errors import ConfigError, FlywheelError, InvalidRecord
from ray_app.ingest import Ingest
from ray_app.schemas import from_blueprint_line
from ray_app.storage import open_log_store

MAX_REPORTED_ERRORS = 10


@dataclass
class LoadStats:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    first_errors: list[tuple[int, str]] = field(default_factory=list)

    def reject(self, line_no: int, reason: str) -> None:
        self.rejected += 1
        if len(self.first_errors) < MAX_REPORTED_ERRORS:
            self.first_errors.append((line_no, reason))


def load_jsonl(settings: Settings, path: str | Path, *, workload_id: str | None = None,
               client_id: str | None = None, batch_size: int = 1000, progress: bool = True) -> LoadStats:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}", field="file")
    store = open_log_store(settings)
    store.ping()
    stats, ingest = LoadStats(), Ingest(settings)
    lines: list[int] = []  # the line number of each record in `batch`
    batch: list[dict] = []
    errors: list[tuple[int, str]] = []  # lines of this batch refused before the door

    def flush() -> None:
        door = ingest.records(batch)
        errors.extend((lines[i], exc.message) for i, exc in door.rejected)
        for line_no, reason in sorted(errors):  # reported in the file's order
            stats.reject(line_no, reason)
        if door.records:
            new = store.put_many(door.records)
            stats.stored += new
            stats.duplicates += len(door.records) - new
        lines.clear()
        batch.clear()
        errors.clear()

    with path.open("rb") as fh, _progress(progress) as bar:
        task = bar.add_task(f"loading {path.name}", total=os.path.getsize(path))
        for line_no, line in enumerate(fh, start=1):
            bar.advance(task, len(line))
            if not line.strip():
                continue
            try:
                batch.append(_as_record(orjson.loads(line), workload_id, client_id))
                lines.append(line_no)
            except orjson.JSONDecodeError as exc:
                errors.append((line_no, f"malformed JSON: {exc}"))
            except FlywheelError as exc:
                errors.append((line_no, exc.message))
            if len(batch) + len(errors) >= batch_size:
                flush()
        flush()
    return stats


def _as_record(line: object, workload_id: str | None, client_id: str | None) -> dict:
    if not isinstance(line, dict):
        raise InvalidRecord(f"each line must be a JSON object, got {type(line).__name__}")
    if "request" not in line and "messages" in line:
        if not (workload_id and client_id):
            raise InvalidRecord("plain messages lines need --workload-id and --client-id", field="workload_id")
        return from_blueprint_line(line, workload_id=workload_id, client_id=client_id)
    if workload_id and "workload_id" not in line:
        line["workload_id"] = workload_id
    if client_id and "client_id" not in line:
        line["client_id"] = client_id
    return line


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)
