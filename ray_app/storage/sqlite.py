"""The embedded default: SQLite files in the data dir, no server needed.

Several Ray processes (Serve replicas, job drivers, train workers) open the same files,
so: WAL mode (readers never block the writer), a generous busy timeout, one connection
per thread, and every read-modify-write inside `BEGIN IMMEDIATE` so two processes can't
interleave a job update or an audit append.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ray_app.errors import NotFound, RecordsRejected, StoreUnavailable
from ray_app.storage.base import AuditStore, JobDict, JobStore, LogStore, chain_entry, record_problem
from ray_app.tool_lists import SHARED_LIST_BYTES


class _SQLite:
    """Thread-local connections to one database file."""

    schema = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.uri = f"sqlite:///{self.path}"
        self._local = threading.local()
        self._writer = threading.Lock()
        # Processes opening a fresh file together (Serve replicas starting at once) race to switch
        # it to WAL, and SQLite's busy timeout does not cover that step: retry it for a while.
        deadline = time.monotonic() + 60.0
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn().executescript(self.schema)
                return
            except sqlite3.OperationalError as exc:
                self.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreUnavailable(f"cannot open embedded store {self.uri}: {exc}") from exc
                time.sleep(0.05 + random.random() * 0.2)
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable(f"cannot open embedded store {self.uri}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast
            conn.execute("PRAGMA busy_timeout=60000")
            # Checkpoint the WAL into the database every ~40 MB instead of SQLite's ~4 MB: under
            # sustained ingest that was ten checkpoints a second, each holding the write lock through
            # its page writes and fsync while the other replica slept in the busy handler.
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # Threads of one process queue on a lock: SQLite's own busy handler would make them
        # sleep 1, 2, 5, 10... ms between tries, which halves ingest throughput under load.
        # Other processes still meet at BEGIN IMMEDIATE.
        with self._writer:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"embedded store {self.uri} is not usable: {exc}") from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# Tool lists at least SHARED_LIST_BYTES long (as JSON) are stored once, not in every row: the size
# from which the door shares one list object too (ray_app/tool_lists.py, where it is defined).


class SQLiteLogStore(_SQLite, LogStore):
    """Each row holds a record's JSON. A service sends the same tool definitions with every record
    (~70% of a tool-calling record's bytes), so each distinct list is kept once in `tool_lists`
    and a row names it in `tools_key` with `request.tools` left null in its body: rows a third the
    size, several to a page instead of one, and the store's own insert rate about doubles."""

    schema = """
    CREATE TABLE IF NOT EXISTS logs (
        id TEXT PRIMARY KEY, workload_id TEXT NOT NULL, client_id TEXT NOT NULL,
        ts REAL NOT NULL, body BLOB NOT NULL, tools_key TEXT);
    CREATE INDEX IF NOT EXISTS logs_workload ON logs (workload_id, client_id, ts);
    CREATE TABLE IF NOT EXISTS tool_lists (key TEXT PRIMARY KEY, body BLOB NOT NULL);
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._lists: dict[str, bytes] = {}  # tool lists read or written by this process, by key
        columns = {row[1] for row in self._conn().execute("PRAGMA table_info(logs)")}
        if "tools_key" not in columns:  # a file written before tool lists were shared
            with self._write() as conn, contextlib.suppress(sqlite3.OperationalError):  # another process did it
                conn.execute("ALTER TABLE logs ADD COLUMN tools_key TEXT")

    def put_many(self, records: Sequence[dict[str, Any]]) -> int:
        rows, rejected, lists, seen = [], [], {}, {}
        for r in records:
            problem = record_problem(r)
            if problem:
                rejected.append({"id": r.get("id"), "reason": problem})
            else:
                body, key = self._pack(r, lists, seen)
                rows.append((r["id"], r["workload_id"], r["client_id"], float(r["timestamp"]), body, key))
        with self._write() as conn:
            conn.executemany("INSERT OR IGNORE INTO tool_lists VALUES (?, ?)", lists.items())
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO logs VALUES (?, ?, ?, ?, ?, ?)", rows)
            new = conn.total_changes - before
        self._lists.update(lists)  # committed: later batches need not write them again
        if rejected:
            raise RecordsRejected(f"{len(rejected)} of {len(records)} records refused by {self.uri}",
                                  accepted=new, rejected=rejected)
        return new

    def _pack(self, record: dict[str, Any], lists: dict[str, bytes],
              seen: dict[int, str | None]) -> tuple[bytes, str | None]:
        """The row's body and tools_key; a list this process has not stored yet goes into `lists`.
        `seen`: keys by list object for one put_many (the door gives a batch's records one shared
        list; the records hold it for the whole call, so an object's id cannot be reused meanwhile)."""
        request = record.get("request")
        tools = request.get("tools") if isinstance(request, dict) else None
        if not isinstance(tools, list):
            return orjson.dumps(record), None
        if id(tools) not in seen:
            data, key = orjson.dumps(tools), None
            if len(data) >= SHARED_LIST_BYTES:
                key = hashlib.sha256(data).hexdigest()[:32]
                if key not in self._lists:
                    lists[key] = data
            seen[id(tools)] = key
        key = seen[id(tools)]
        if key is None:
            return orjson.dumps(record), None
        return orjson.dumps({**record, "request": {**request, "tools": None}}), key

    def _unpack(self, body: bytes, key: str | None) -> dict[str, Any]:
        record = orjson.loads(body)
        if key is not None:
            data = self._lists.get(key)
            if data is None:
                row = self._conn().execute("SELECT body FROM tool_lists WHERE key = ?", (key,)).fetchone()
                data = self._lists[key] = row[0]
            record["request"]["tools"] = orjson.loads(data)  # a list of its own: callers may change it
        return record

    def get(self, record_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT body, tools_key FROM logs WHERE id = ?", (record_id,)).fetchone()
        return self._unpack(*row) if row else None

    def query(self, *, workload_id: str | None = None, client_id: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        where, args = _filters(workload_id=workload_id, client_id=client_id)
        rows = self._conn().execute(
            f"SELECT body, tools_key FROM logs {where} ORDER BY ts DESC, rowid DESC LIMIT ?", (*args, limit))
        return [self._unpack(b, k) for b, k in rows]

    def export(self, workload_id: str, client_id: str, *, limit: int | None = None,
               batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        # Keyset pagination on (ts, rowid): constant memory, no offset scans.
        last_ts, last_row, served = float("-inf"), -1, 0
        while limit is None or served < limit:
            page = batch_size if limit is None else min(batch_size, limit - served)
            rows = self._conn().execute(
                "SELECT ts, rowid, body, tools_key FROM logs WHERE workload_id = ? AND client_id = ? "
                "AND (ts > ? OR (ts = ? AND rowid > ?)) ORDER BY ts, rowid LIMIT ?",
                (workload_id, client_id, last_ts, last_ts, last_row, page)).fetchall()
            if not rows:
                return
            for ts, rowid, body, key in rows:
                last_ts, last_row = ts, rowid
                served += 1
                yield self._unpack(body, key)

    def workloads(self) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT workload_id, client_id, COUNT(*) FROM logs GROUP BY workload_id, client_id "
            "ORDER BY workload_id, client_id")
        return [{"workload_id": w, "client_id": c, "count": n} for w, c, n in rows]

    def count(self, workload_id: str, client_id: str) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM logs WHERE workload_id = ? AND client_id = ?",
                                    (workload_id, client_id)).fetchone()[0]

    def set_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        with self._write() as conn:
            row = conn.execute("SELECT body FROM logs WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return False
            body = orjson.loads(row[0])
            body["feedback"] = {**(body.get("feedback") or {}), **feedback}
            conn.execute("UPDATE logs SET body = ? WHERE id = ?", (orjson.dumps(body), record_id))
            return True


class SQLiteJobStore(_SQLite, JobStore):
    schema = """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, workload_id TEXT NOT NULL, client_id TEXT NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL, doc BLOB NOT NULL);
    CREATE INDEX IF NOT EXISTS jobs_workload ON jobs (workload_id, client_id, created_at);
    CREATE TABLE IF NOT EXISTS api_keys (hash TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT,
                                         created_at REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS docs (collection TEXT NOT NULL, id TEXT NOT NULL, doc BLOB NOT NULL,
                                     PRIMARY KEY (collection, id));
    """

    def create_job(self, job: JobDict) -> JobDict:
        with self._write() as conn:
            conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                         (job["id"], job["workload_id"], job["client_id"], job["status"],
                          job["created_at"], orjson.dumps(job)))
        return job

    def get_job(self, job_id: str) -> JobDict:
        row = self._conn().execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", field="id")
        return orjson.loads(row[0])

    def list_jobs(self, *, workload_id: str | None = None, client_id: str | None = None,
                  status: str | None = None, limit: int = 100) -> list[JobDict]:
        where, args = _filters(workload_id=workload_id, client_id=client_id, status=status)
        rows = self._conn().execute(
            f"SELECT doc FROM jobs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, limit))
        return [orjson.loads(d) for (d,) in rows]

    def update_job(self, job_id: str, mutate: Callable[[JobDict], None]) -> JobDict:
        with self._write() as conn:
            row = conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}", field="id")
            job = orjson.loads(row[0])
            mutate(job)
            job["updated_at"] = time.time()
            conn.execute("UPDATE jobs SET status = ?, doc = ? WHERE id = ?",
                         (job["status"], orjson.dumps(job), job_id))
        return job

    def delete_job(self, job_id: str) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 0:
                raise NotFound(f"no job with id {job_id!r}", field="id")

    def put_api_key(self, key_hash: str, role: str, name: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO api_keys VALUES (?, ?, ?, ?)", (key_hash, role, name, time.time()))

    def get_api_key(self, key_hash: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT role, name FROM api_keys WHERE hash = ?", (key_hash,)).fetchone()
        return {"role": row[0], "name": row[1]} if row else None

    def get_doc(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT doc FROM docs WHERE collection = ? AND id = ?",
                                   (collection, doc_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    def update_doc(self, collection: str, doc_id: str,
                   mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self._write() as conn:
            row = conn.execute("SELECT doc FROM docs WHERE collection = ? AND id = ?",
                               (collection, doc_id)).fetchone()
            doc = orjson.loads(row[0]) if row else {}
            mutate(doc)
            conn.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (collection, doc_id, orjson.dumps(doc)))
        return doc

    def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self._conn().execute("SELECT id, doc FROM docs WHERE collection = ? ORDER BY id", (collection,))
        return [(doc_id, orjson.loads(doc)) for doc_id, doc in rows.fetchall()]


class SQLiteAuditStore(_SQLite, AuditStore):
    schema = """
    CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, doc BLOB NOT NULL);
    """

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._write() as conn:
            row = conn.execute("SELECT doc FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            entry = chain_entry(orjson.loads(row[0]) if row else None, event)
            conn.execute("INSERT INTO audit VALUES (?, ?, ?)", (entry["seq"], entry["hash"], orjson.dumps(entry)))
        return entry

    def entries(self, *, start_seq: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        seq, served = start_seq - 1, 0
        while limit is None or served < limit:
            rows = self._conn().execute("SELECT seq, doc FROM audit WHERE seq > ? ORDER BY seq LIMIT 1000",
                                        (seq,)).fetchall()
            if not rows:
                return
            for _, doc in rows:
                if limit is not None and served >= limit:
                    return
                served += 1
                yield orjson.loads(doc)
            seq = rows[-1][0]  # the next page starts after this one's last entry


def _filters(**equals: str | None) -> tuple[str, tuple]:
    pairs = [(k, v) for k, v in equals.items() if v is not None]
    if not pairs:
        return "", ()
    return "WHERE " + " AND ".join(f"{k} = ?" for k, _ in pairs), tuple(v for _, v in pairs)
