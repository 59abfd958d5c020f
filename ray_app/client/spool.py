"""An append-only spool of records the service has not acknowledged yet.

Records are JSON lines in segment files `<time_ns>-<owner>-<n>.jsonl`. The writer holds an
exclusive flock on its active segment, taken before the segment appears under that name (a
writer killed in between leaves an empty `.<name>.new` that nothing reads). A replayer claims a
closed segment with a non-blocking flock, so a segment is never replayed while its writer
lives, and the lock of a killed process is released by the kernel, which makes its segments
claimable by the next client on the same directory. Writes are single `os.write` calls (they
reach the kernel at once, so SIGKILL loses nothing written); `sync()` fsyncs at batch
boundaries. A replayed segment is deleted only after every record in it was acknowledged or
reported; a crash before that replays it again, which the service's idempotency by record id
makes harmless.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

SEGMENT_BYTES = 8 << 20


@dataclass
class Segment:
    """A claimed segment: its good lines, how far the replay got, and the fd holding the lock."""

    path: Path
    fd: int
    lines: list[bytes]
    corrupt: list[bytes] = field(default_factory=list)
    offset: int = 0


class Spool:
    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.owner = f"{os.getpid()}x{uuid.uuid4().hex[:8]}"
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._count = 0
        self._dirty = False

    # ---- writing (caller threads on overflow, the sender when the service is down) ----

    def append(self, lines: list[bytes]) -> None:
        """Append encoded records; raises OSError with nothing half-written."""
        data = b"\n".join(lines) + b"\n"
        with self._lock:
            if self._fd is None or self._size >= self._segment_bytes:
                self._open_segment_locked()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                os.ftruncate(self._fd, self._size)  # keep the segment a whole number of lines
                raise
            self._size += len(data)
            self._dirty = True

    def sync(self) -> None:
        with self._lock:
            if self._dirty and self._fd is not None:
                os.fsync(self._fd)
                self._dirty = False

    def seal(self) -> None:
        """Close the active segment (fsynced) so it can be replayed; the next append opens a new one."""
        with self._lock:
            self._close_segment_locked()

    def active_bytes(self) -> int:
        return self._size if self._fd is not None else 0

    def _open_segment_locked(self) -> None:
        self._close_segment_locked()
        self._count += 1
        path = self.dir / f"{time.time_ns():020d}-{self.owner}-{self._count:06d}.jsonl"
        # locked under a name no replayer looks at, then renamed into view: a replayer that found
        # it between open and flock would claim it empty and delete it under the writer
        hidden = path.with_name(f".{path.name}.new")
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(hidden, path)
        self._fd, self._path, self._size = fd, path, 0
        _fsync_dir(self.dir)

    def _close_segment_locked(self) -> None:
        if self._fd is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)  # releases the flock
        if self._size == 0 and self._path is not None:
            self._path.unlink(missing_ok=True)
        self._fd, self._path, self._size, self._dirty = None, None, 0, False

    # ---- replaying (the sender only) ----

    def has_pending(self) -> bool:
        """Anything on disk not yet acknowledged: the active segment or any segment file."""
        return self.active_bytes() > 0 or any(p != self._path for p in self.dir.glob("*.jsonl"))

    def claim(self) -> Segment | None:
        """The oldest closed segment no live process holds, locked and read; None if there is none."""
        for path in sorted(self.dir.glob("*.jsonl")):
            if path == self._path:
                continue
            segment = self._try_claim(path)
            if segment is not None:
                return segment
        return None

    def _try_claim(self, path: Path) -> Segment | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a replayer that finished this file may have deleted it between our open and lock
            if os.fstat(fd).st_ino != path.stat().st_ino:
                raise FileNotFoundError(path)
            with open(fd, "rb", closefd=False) as fh:
                raw = fh.read()
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        good, corrupt = [], []
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:  # a line torn by a crash mid-write is reported, never sent
                orjson.loads(line)
                good.append(line)
            except orjson.JSONDecodeError:
                corrupt.append(line)
        return Segment(path=path, fd=fd, lines=good, corrupt=corrupt)

    def release(self, segment: Segment, *, done: bool) -> None:
        """Delete a fully delivered segment (still holding its lock), or just unlock it."""
        if done:
            segment.path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
        os.close(segment.fd)

    def close(self) -> None:
        self.seal()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
