"""What happens at the door, for the Serve app and `flywheel load` alike.

Validate the OpenAI shapes, scrub PII from every string (before anything is written or
logged, and before the id is derived; see `stored_id` for client-given ids), stamp the
constitutional hash, and reject a record that carries another hash. Counts per PII type come back for the metrics.
A service's tool definitions, the same in every record, are parsed, scrubbed and hashed once
(ray_app/tool_lists.py).
"""
from __future__ import annotations

import gc
import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from ray_app.config import Settings
from ray_app.errors import MalformedJSON
from ray_app.governance.pii import find_pii, scrub_record
from ray_app.schemas import normalize, parse_ingest_body, record_id
from ray_app.tool_lists import ToolLists


def stored_id(record_id: str) -> str:
    """The id a record is stored under: the client's own, unless it looks like PII.

    Ids are idempotency keys, so scrubbing them to placeholders would merge unrelated records
    (and random hex ids do contain card-like digit runs). An id the scrubber would change is
    replaced by a stable digest instead: retries still dedupe, feedback still finds the record
    (the feedback route maps ids the same way), and no raw value is stored.
    """
    if not find_pii(record_id):
        return record_id
    return "pid-" + hashlib.sha256(record_id.encode()).hexdigest()[:32]


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside; reference counting still frees everything acyclic.

    For turning a body into records: a big batch allocates a few hundred thousand acyclic objects
    (parsed JSON), which the collector would otherwise walk over and over - a third of the time.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Ingest:
    def __init__(self, settings: Settings):
        self.constitutional_hash = settings.governance.constitutional_hash
        self.max_records = settings.serve.max_batch_records
        self.pii_found: Counter[str] = Counter()  # since the last take_pii_counts()
        self.tool_lists = ToolLists()

    def parse(self, raw: bytes) -> Any:
        """An HTTP body's bytes -> parsed JSON (tool lists seen before shared, see tool_lists.py)."""
        try:
            return self.tool_lists.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedJSON(f"malformed JSON: {exc}", field="(body)") from exc

    def _scrub(self, record: dict[str, Any]) -> dict[str, Any]:
        # In place: every record reaching here is freshly parsed JSON that nothing else holds, and
        # copying it would cost as much as scrubbing it. A shared tool list (clean, see tool_lists.py)
        # steps out of the walk and comes back after it.
        request = record.get("request")
        known = self.tool_lists.known(request.get("tools")) if isinstance(request, dict) else None
        if known is not None:
            request["tools"] = None
        given = record.pop("id", None)  # the id is not scrubbed but mapped (stored_id); it comes back last
        clean, counts = scrub_record(record, in_place=True)
        if known is not None:
            request["tools"] = known.tools
        if counts:
            self.pii_found.update(counts)
        if given is not None:
            clean["id"] = stored_id(given)
        elif known is not None:
            clean["id"] = record_id(clean, known_tools=(known.tools, known.id_digest))  # its digest hashed once
        return clean

    def body(self, body: Any) -> list[dict[str, Any]]:
        """An HTTP body (one record or {"records": [...]}) -> the records to store, or InvalidRecord.

        The body is parsed JSON that the caller gives up: its strings are scrubbed in place.
        """
        return parse_ingest_body(body, constitutional_hash=self.constitutional_hash,
                                 max_records=self.max_records, scrub=self._scrub)

    def record(self, raw: dict[str, Any]) -> dict[str, Any]:
        return normalize(raw, constitutional_hash=self.constitutional_hash, scrub=self._scrub)

    def take_pii_counts(self) -> Counter[str]:
        counts, self.pii_found = self.pii_found, Counter()
        return counts
