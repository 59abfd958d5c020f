"""Tool definitions handled once per distinct list at the door, not once per record.

A tool-calling service sends the same `tools` list with every record: in the simulated
customer-service traffic it is 70% of a record's bytes and nearly 90% of orjson's time to parse
one, and validating, scrubbing and hashing it is the same work every time. So ingest parses a
body with every list it has seen before cut out of the bytes, and puts the list back as one
shared object (read-only: every record of the body refers to it), whose scrub and id digest are
known already.

Why a byte match is sound: `"tools":` followed by the exact bytes a client sent before. In valid
JSON an unescaped quote right before `tools"` can only open a string, so the match is a key
`tools` and a complete value; or it starts at an escaped quote inside a longer key (`"a \\"tools":`),
which puts the marker somewhere other than a record's `request.tools`. Any marker not found there
(the count put back differs from the count cut out) makes `loads` parse the body as sent. A body
that fails to parse is parsed again as sent, so the error points into the client's own bytes.

Only lists with nothing to scrub are kept: no personal data stays in memory, and the shared list
is the stored one. Every other list (shorter, holding personal data, or in a record parsed before its
list was learned) is scrubbed once per distinct list too (`scrubbed`, which remembers the last few
hundred lists by their bytes as sent). This object is the door's one cache of tool lists; a lock
keeps it whole when several threads ingest through the same door.
"""
from __future__ import annotations

import json
import secrets
import threading
from collections import Counter, OrderedDict
from typing import Any, NamedTuple

import orjson

from ray_app.governance.pii import scrub_value
from ray_app.schemas import tools_digest

_KEY = b'"tools":'
_HEAD = 64  # bytes from the key on that index the known lists (the first tool's name is in them)
# A tool list at least this long (compact JSON) is handled once, not in every record: at the door
# (shorter ones cost less to parse than to look up) and in the embedded store (storage/sqlite.py).
SHARED_LIST_BYTES = 256


class KnownList(NamedTuple):
    pattern: bytes  # `"tools":` and the list, exactly as the client sent them
    marker: str  # the string that stands in the list's place while the body is parsed
    stand_in: bytes  # `"tools":` and the marker as JSON
    tools: list  # parsed; nothing in it to scrub
    id_digest: str  # what stands for it in a record's id (schemas.tools_digest)


def _forms(tools: list, compact: bytes) -> list[bytes]:
    """The ways clients serialize a list: `compact` (orjson, JavaScript, serde) or Python's json module."""
    spaced = [json.dumps(tools, ensure_ascii=ascii_only).encode() for ascii_only in (True, False)]
    return [key + form for form in dict.fromkeys([compact, *spaced]) for key in (_KEY, b'"tools": ')]


class ToolLists:
    def __init__(self, *, capacity: int = 64):
        self._capacity = capacity
        self._known: OrderedDict[bytes, KnownList] = OrderedDict()  # pattern -> list, least recent first
        self._by_head: dict[bytes, list[KnownList]] = {}
        self._by_object: dict[int, KnownList] = {}  # id(tools) -> its entry (which keeps the object alive)
        self._by_marker: dict[str, KnownList] = {}
        self._tried: set[bytes] = set()  # compact lists looked for before (found, unmatched or with PII)
        # compact list -> (its scrub as JSON, or None when scrubbing changes nothing; counts), oldest first
        self._scrubs: OrderedDict[bytes, tuple[bytes | None, Counter[str]]] = OrderedDict()
        self._lock = threading.RLock()  # _learn, holding it, remembers a scrub
        self._nonce = secrets.token_hex(8)  # markers no client can send by chance
        self._added = 0

    def known(self, tools: Any) -> KnownList | None:
        """The entry when `tools` is a list that `loads` put back (the shared object itself)."""
        entry = self._by_object.get(id(tools))
        return entry if entry is not None and entry.tools is tools else None

    def scrubbed(self, tools: list, counts: Counter[str]) -> list:
        """`tools` scrubbed of PII (the list itself when there is nothing to scrub; else a fresh copy:
        callers may change it), with what was found added to `counts`. Scrubbing is a pure function of
        the list, so each distinct list is scrubbed once."""
        return self._scrub(tools, orjson.dumps(tools), counts)

    def _scrub(self, tools: list, compact: bytes, counts: Counter[str]) -> list:
        hit = self._scrubs.get(compact)
        if hit is None:
            found: Counter[str] = Counter()
            clean = orjson.dumps(scrub_value(tools, found))
            hit = (None if clean == compact else clean, found)
            with self._lock:
                self._scrubs[compact] = hit
                while len(self._scrubs) > 4 * self._capacity:
                    self._scrubs.popitem(last=False)
        counts.update(hit[1])
        return tools if hit[0] is None else orjson.loads(hit[0])

    def loads(self, raw: bytes) -> Any:
        """orjson.loads(raw), with each known list cut out of the bytes and put back after."""
        with self._lock:
            spliced, cut = self._cut(raw)
        body = None
        if cut:
            try:
                body = orjson.loads(spliced)
            except orjson.JSONDecodeError:
                pass  # parsed again as sent below, so the error points into the client's own bytes
            if body is not None and self._put_back(body) != cut:
                body = None
        if body is None:
            body = orjson.loads(raw)
        with self._lock:
            self._learn(body, raw)
        return body

    def _cut(self, raw: bytes) -> tuple[bytes, int]:
        if not self._known:
            return raw, 0
        pieces, used, last, cut = [], set(), 0, 0
        pos = raw.find(_KEY)
        while pos >= 0:
            entry = next((e for e in self._by_head.get(raw[pos:pos + _HEAD], ())
                          if raw.startswith(e.pattern, pos)), None)
            if entry is None:
                pos = raw.find(_KEY, pos + len(_KEY))
                continue
            used.add(entry.pattern)
            pieces += (raw[last:pos], entry.stand_in)
            last, cut = pos + len(entry.pattern), cut + 1
            pos = raw.find(_KEY, last)
        for pattern in used:
            self._known.move_to_end(pattern)
        if not cut:
            return raw, 0
        pieces.append(raw[last:])
        return b"".join(pieces), cut

    @staticmethod
    def _requests(body: Any) -> list[dict]:
        records = body.get("records") if isinstance(body, dict) and "records" in body else [body]
        if not isinstance(records, list):
            return []
        return [r["request"] for r in records if isinstance(r, dict) and isinstance(r.get("request"), dict)]

    def _put_back(self, body: Any) -> int:
        put = 0
        for request in self._requests(body):
            tools = request.get("tools")
            if type(tools) is str and tools in self._by_marker:
                request["tools"] = self._by_marker[tools].tools
                put += 1
        return put

    def _learn(self, body: Any, raw: bytes) -> None:
        """Keep the lists of this body that came as a list (not put back) and are worth keeping."""
        for request in self._requests(body):
            tools = request.get("tools")
            if not isinstance(tools, list) or self.known(tools) is not None:
                continue
            compact = orjson.dumps(tools)
            if len(compact) < SHARED_LIST_BYTES or compact in self._tried:
                continue
            if len(self._tried) >= 4 * self._capacity:
                self._tried.clear()
            self._tried.add(compact)
            found: Counter[str] = Counter()
            self._scrub(tools, compact, found)  # remembered: this body's records ask for it next
            if found:
                continue  # personal data in the definitions: scrubbed per record, never kept
            pattern = next((p for p in _forms(tools, compact) if p in raw), None)
            if pattern is not None:
                self._added += 1
                marker = f"\x00tools-{self._nonce}-{self._added}"
                self._add(KnownList(pattern, marker, _KEY + orjson.dumps(marker), tools,
                                    tools_digest(tools)))

    def _add(self, entry: KnownList) -> None:
        self._known[entry.pattern] = entry
        self._by_head.setdefault(entry.pattern[:_HEAD], []).append(entry)
        self._by_object[id(entry.tools)] = entry
        self._by_marker[entry.marker] = entry
        while len(self._known) > self._capacity:
            _, old = self._known.popitem(last=False)
            self._by_head[old.pattern[:_HEAD]].remove(old)
            if not self._by_head[old.pattern[:_HEAD]]:
                del self._by_head[old.pattern[:_HEAD]]
            del self._by_object[id(old.tools)]
            del self._by_marker[old.marker]
