"""PII scrubbing for log records, applied before anything is stored or logged.

`scrub_record` / `scrub_text` replace every PII value by its typed placeholder (`<EMAIL>`, `<SSN>`,
`<CREDIT_CARD>`, `<IP_ADDRESS>`, `<PHONE>`, `<IBAN>`) and count what they replaced; what counts as
PII, and the decisions on look-alikes, unicode and hostile input, are in pii_detect.py (phone numbers
in pii_phone.py).
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any, Final

import orjson

from ray_app.governance.pii_detect import HINTS, PLACEHOLDERS, apply_spans, find_pii

__all__ = ["PLACEHOLDERS", "find_pii", "scrub_record", "scrub_text", "scrub_value"]


def scrub_text(text: str) -> tuple[str, Counter[str]]:
    """`text` with every PII value replaced by its placeholder, and the count per type."""
    spans = find_pii(text)
    if not spans:
        return text, Counter()
    return apply_spans(text, spans), Counter([kind for _, _, kind in spans])


# ---- records ------------------------------------------------------------------------------------
#
# Every string of the record is scrubbed, keys included, walked iteratively (no recursion limit on
# deep JSON). Two places get extra care:
#   * tool-call "arguments" given as a JSON string are parsed, scrubbed inside and serialized back
#     (still a string; untouched, formatting included, when nothing was found). Unparseable
#     arguments are scrubbed as plain text.
#   * values split across fields: the text parts of a list-of-parts "content" are also checked
#     joined ("" between parts: they are one text cut in pieces), and the string values of an
#     arguments object joined with " " (separate fields: {"area": "415", "number": "555-2671"}).
#     A value found across a boundary is replaced in the first piece and cut from the others.

def scrub_record(record: dict[str, Any], *, in_place: bool = False) -> tuple[dict[str, Any], Counter[str]]:
    """A scrubbed copy of `record` (the input is not modified) and the count per PII type.

    `in_place` changes `record`'s own parts instead of copying them (no allocation for what needs no
    change): for freshly parsed JSON that nothing else holds. A service's tool definitions, the same
    in every record, are best scrubbed once per distinct list: the door does that (ToolLists.scrubbed
    in ray_app/tool_lists.py, which owns what it remembers), and takes them out of the record first.
    """
    counts: Counter[str] = Counter()
    return _walk(record, counts, in_place=in_place), counts


def scrub_value(value, counts: Counter[str] | None = None):
    """Scrub any JSON-like value (dict, list, str, scalar); returns the scrubbed copy."""
    return _walk(value, Counter() if counts is None else counts)


# A text without a digit, "@", ":" or a non-ASCII character cannot hold PII of any kind (see
# find_pii's own precheck): one C-level search settles most strings of a record.
_SUSPECT = re.compile(r"[0-9@:\x80-\U0010ffff]")
# Compiled (ray_app/native.py), this module is a C extension, and a plain loop over a text's
# characters answers the same question 3x faster than a call into the regex engine; run as Python,
# the same loop would be 20x slower than it (black decides its compiled paths the same way).
_COMPILED: Final = __file__.endswith(tuple(EXTENSION_SUFFIXES))


def _suspect(text: str) -> bool:
    if not _COMPILED:
        return _SUSPECT.search(text) is not None
    if not text.isascii():
        return True
    for i in range(len(text)):
        c = ord(text[i])
        if 48 <= c <= 58 or c == 64:  # 0-9, ":" and "@"
            return True
    return False


def _text(value: str, counts: Counter[str]) -> str:
    return _detected(value, counts) if _suspect(value) else value


# Short texts the detectors found clean (model names, call ids, repeated prompts): most recur in
# every record of a service. Only clean texts are kept, so no personal data stays in memory. A memo
# of a pure function of one string, not a cache of tool lists (those belong to ToolLists): every
# scrub in the process shares it (the door, the audit log's scrub_value), and it stays correct under
# threads (set operations are atomic; a race only finds a string again).
_CLEAN: set[str] = set()
_CLEAN_MAX, _CLEAN_LEN = 4096, 128


def _detected(value: str, counts: Counter[str]) -> str:
    if value in _CLEAN:
        return value
    spans = find_pii(value)
    if not spans:
        if len(value) <= _CLEAN_LEN:
            if len(_CLEAN) >= _CLEAN_MAX:
                _CLEAN.clear()
            _CLEAN.add(value)
        return value
    counts.update(kind for _, _, kind in spans)
    return apply_spans(value, spans)


# Field names of the OpenAI and record schemas hold no data: skip the detector for them.
_SCHEMA_KEYS = frozenset({
    "id", "timestamp", "workload_id", "client_id", "workload_type", "service_name", "constitutional_hash",
    "request", "response", "model", "messages", "role", "content", "name", "tools", "tool_calls",
    "tool_call_id", "type", "function", "arguments", "description", "parameters", "properties", "required",
    "choices", "index", "message", "finish_reason", "usage", "prompt_tokens", "completion_tokens",
    "total_tokens", "object", "created", "text", "temperature", "max_tokens", "top_p", "stream",
    "performance_metrics", "feedback", "rating", "enum", "items",
})


def _walk(root: Any, counts: Counter[str], *, in_place: bool = False) -> Any:
    """The scrubbed copy of `root`; or `root` itself, changed where needed, when `in_place`."""
    if isinstance(root, str):
        return _text(root, counts)
    if not isinstance(root, (dict, list)):
        return root
    out = root if in_place else {} if isinstance(root, dict) else root[:]
    stack: list[tuple[Any, Any]] = [(root, out)]
    joins: list[tuple[Any, str]] = []  # containers to re-check joined, after their own scrub
    while stack:
        src, dst = stack.pop()
        if isinstance(src, dict):
            renamed: dict[Any, Any] | None = None
            for key, value in src.items():
                name = key
                if key not in _SCHEMA_KEYS and isinstance(key, str) and _suspect(key):
                    name = _detected(key, counts)
                if isinstance(value, str):
                    if _suspect(value):
                        value = _arguments(value, counts) if name == "arguments" else _detected(value, counts)
                        if in_place:
                            src[key] = value  # an existing key: the dict keeps its size while iterated
                elif isinstance(value, (dict, list)):
                    child = value if in_place else {} if isinstance(value, dict) else value[:]
                    stack.append((value, child))
                    if name == "content" and isinstance(value, list):
                        joins.append((child, ""))
                    elif name == "arguments" and isinstance(value, dict):
                        joins.append((child, " "))
                    value = child
                if not in_place:
                    dst[name] = value
                elif name is not key:
                    renamed = renamed or {}
                    renamed[key] = name
            if renamed:  # keys are renamed after the loop, each keeping its place
                items = list(src.items())
                src.clear()
                src.update((renamed.get(k, k), v) for k, v in items)
        else:  # a list: `dst` starts as a copy (or is `src`): only changed strings and containers are written
            for i, value in enumerate(src):
                if isinstance(value, str):
                    if _suspect(value):
                        dst[i] = _detected(value, counts)
                elif isinstance(value, (dict, list)):
                    child = value if in_place else {} if isinstance(value, dict) else value[:]
                    stack.append((value, child))
                    dst[i] = child
    for container, sep in joins:
        _scrub_joined(_string_slots(container, sep == ""), sep, counts)
    return out


def _arguments(raw: str, counts: Counter[str]) -> str:
    stripped = raw.lstrip()
    if not stripped.startswith(("{", "[")) or not _suspect(raw):
        return _text(raw, counts)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _text(raw, counts)
    found: Counter[str] = Counter()
    scrubbed = _walk({"arguments": parsed}, found)["arguments"]
    if not found:
        return raw
    counts.update(found)
    return orjson.dumps(scrubbed).decode()


def _string_slots(container: Any, parts_only: bool) -> list[tuple[Any, Any]]:
    """(container, key) of the strings to join: text parts of a content list, or every string leaf."""
    slots: list[tuple[Any, Any]] = []
    stack = [container]
    while stack:
        node = stack.pop()
        items = list(node.items() if isinstance(node, dict) else enumerate(node))
        for key, value in reversed(items) if not parts_only else items:
            if isinstance(value, str) and (not parts_only or key == "text"):
                slots.append((node, key))
            elif isinstance(value, dict) and parts_only:
                if isinstance(value.get("text"), str):
                    slots.append((value, "text"))
            elif isinstance(value, (dict, list)) and not parts_only:
                stack.append(value)
    return slots if parts_only else slots[::-1]


def _scrub_joined(slots: list[tuple[Any, Any]], sep: str, counts: Counter[str]) -> None:
    if len(slots) < 2:
        return
    pieces = [node[key] for node, key in slots]
    if sum(1 for p in pieces if HINTS.search(p) or ":" in p) < 2:
        return
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece) + len(sep)
    edits: dict[int, list[tuple[int, int, str]]] = {}
    for s, e, kind in find_pii(sep.join(pieces)):
        first, last = bisect_right(starts, s) - 1, bisect_right(starts, e - 1) - 1
        if first == last:
            continue  # inside one piece: that piece's own scrub already saw it
        counts[kind] += 1
        for i in range(first, last + 1):
            lo, hi = max(s - starts[i], 0), min(e - starts[i], len(pieces[i]))
            edits.setdefault(i, []).append((lo, hi, PLACEHOLDERS[kind] if i == first else ""))
    for i, changes in edits.items():
        text = pieces[i]
        for lo, hi, repl in sorted(changes, reverse=True):
            text = text[:lo] + repl + text[hi:]
        node, key = slots[i]
        node[key] = text
