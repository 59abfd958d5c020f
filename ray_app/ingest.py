"""What happens at the door, for the Serve app and `flywheel load` alike.

Validate the OpenAI shapes, scrub PII from every string (before anything is written or
logged, and before the id is derived; see `stored_id` for client-given ids), stamp the
constitutional hash, and reject a record that carries another hash. One call takes a body's bytes
(`Ingest.body`) or parsed records (`Ingest.records`) to an `IngestResult`: the records and, for the
metrics and the audit, the count per PII type found in exactly them. Nothing is carried from one call
to the next but the tool lists: a service's tool definitions, the same in every record, are parsed,
scrubbed and hashed once (ray_app/tool_lists.py, the one object that remembers them).
"""
from __future__ import annotations

import gc
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from ray_app.config import Settings
from ray_app.errors import FlywheelError, MalformedJSON
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


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What the door made of one call."""
    records: list[dict[str, Any]]  # validated, PII-scrubbed, hash-stamped: what is stored
    pii_counts: Counter[str]  # per PII type, found in these records (this call's alone)
    # Ingest.records only: (index in the input, why) for each record left out; a body is all or nothing
    rejected: list[tuple[int, FlywheelError]] = field(default_factory=list)


class Ingest:
    """The door. Its calls may come from several threads: each counts its own PII, and the tool
    lists it remembers are locked (tool_lists.py)."""

    def __init__(self, settings: Settings):
        self.constitutional_hash = settings.governance.constitutional_hash
        self.max_records = settings.serve.max_batch_records
        self.tool_lists = ToolLists()

    def body(self, raw: bytes) -> IngestResult:
        """An HTTP body's bytes (one record or {"records": [...]}) -> its records, all or none:
        MalformedJSON, or InvalidRecord naming every bad field. Tool lists seen before are shared
        (tool_lists.py)."""
        try:
            parsed = self.tool_lists.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedJSON(f"malformed JSON: {exc}", field="(body)") from exc
        counts: Counter[str] = Counter()
        # The parse is the door's own: nothing else holds it, so its strings are scrubbed in place.
        records = parse_ingest_body(parsed, constitutional_hash=self.constitutional_hash,
                                    max_records=self.max_records, scrub=partial(self._scrub, counts=counts))
        return IngestResult(records, counts)

    def records(self, raws: Iterable[dict[str, Any]]) -> IngestResult:
        """Parsed records (a file's lines, gateway calls), each taken or left out on its own: the ones
        left out are in `rejected`. The caller gives them up: their strings are scrubbed in place."""
        counts: Counter[str] = Counter()
        scrub = partial(self._scrub, counts=counts)
        out, rejected = [], []
        for i, raw in enumerate(raws):
            try:
                out.append(normalize(raw, constitutional_hash=self.constitutional_hash, scrub=scrub))
            except FlywheelError as exc:
                rejected.append((i, exc))
        return IngestResult(out, counts, rejected)

    def _scrub(self, record: dict[str, Any], counts: Counter[str]) -> dict[str, Any]:
        # In place: every record reaching here is freshly parsed JSON that nothing else holds, and
        # copying it would cost as much as scrubbing it. Its tool list steps out of the walk and comes
        # back after it: a shared one (clean, see tool_lists.py) as it is, any other scrubbed once per
        # distinct list (ToolLists.scrubbed). Called back from inside validation (parse_ingest_body,
        # normalize): after the shapes are checked, before the id is derived from the scrubbed content.
        request = record.get("request")
        tools = request.get("tools") if isinstance(request, dict) else None
        known = self.tool_lists.known(tools)
        if isinstance(tools, list) and tools:
            request["tools"] = None  # an existing key: it keeps its place
        given = record.pop("id", None)  # the id is not scrubbed but mapped (stored_id); it comes back last
        clean, found = scrub_record(record, in_place=True)
        if found:
            counts.update(found)
        if known is not None:
            request["tools"] = known.tools
        elif isinstance(tools, list) and tools:
            request["tools"] = self.tool_lists.scrubbed(tools, counts)
        if given is not None:
            clean["id"] = stored_id(given)
        elif known is not None:
            clean["id"] = record_id(clean, known_tools=(known.tools, known.id_digest))  # its digest hashed once
        return clean
