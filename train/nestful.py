"""NESTFUL call sequences cut into the turns a chat model sees: what it can call at once, and what next.

A NESTFUL item is a user request and the sequence of calls that serves it; a later call names an
earlier call's result as "$var1.coordinates.latitude$". Two assistant turns come out of a sequence:
round one, the calls that need no earlier result (answered from the user's text alone, in parallel
when there are several); round two, the calls that need only round one's results, each reference
replaced by the value read from the result the tool returned (only complexfuncbench records them).

Complexfuncbench also writes many dependencies as plain literals: a Search_Attractions `id`, a
`hotel_id` or a flight `token` copied from an earlier result with no "$var" mark (about half of its
unmarked later calls). No model can produce those from the user's text, so a literal that an earlier
result holds and the user's text does not counts as a dependency too ("hidden").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

REF = re.compile(r"\$(var\d+)(?:\.([^$]*))?\$")
# Dates and times are what a user says as "tomorrow at 8": results echo them, users don't spell them.
_DATE_OR_TIME = re.compile(r"\d{4}-\d\d-\d\d|\d\d:\d\d")
_MIN_HIDDEN_CHARS = 4  # shorter literals ("2", "USD") match some result by chance
_MISSING = object()


@dataclass(frozen=True)
class SecondTurn:
    """Round one's calls, their results as tool messages would hold them, and round two resolved."""
    first: list[dict[str, Any]]
    results: list[str]
    second: list[dict[str, Any]]


def references(value: Any) -> list[tuple[str, str]]:
    """Every (label, dotted path) a call's arguments name, in order."""
    return [(m.group(1), m.group(2) or "") for m in REF.finditer(json.dumps(value))]


def _scalars(value: Any) -> list[Any]:
    """The non-bool scalar leaves of a JSON value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _scalars(v)]
    if isinstance(value, list):
        return [s for v in value for s in _scalars(v)]
    return [] if value is None or isinstance(value, bool) else [value]


def _hidden(call: dict[str, Any], earlier: set[str], user_text: str) -> list[Any]:
    """The literals of `call` an earlier result holds and the user never wrote (see the module doc)."""
    lowered = user_text.lower()
    return [v for v in _scalars(call.get("arguments"))
            if len(str(v)) >= _MIN_HIDDEN_CHARS and not _DATE_OR_TIME.fullmatch(str(v))
            and str(v).lower() not in lowered and str(v) in earlier]


def first_round(calls: list[dict[str, Any]], user_text: str) -> list[int]:
    """Indices of the calls answerable from the user's text alone: no reference, no hidden literal."""
    earlier: set[str] = set()
    out = []
    for i, call in enumerate(calls):
        if not references(call.get("arguments")) and not _hidden(call, earlier, user_text):
            out.append(i)
        if "response" in call:
            earlier.update(str(s) for s in _scalars(call["response"]))
    return out


def resolve(response: Any, path: str) -> Any:
    """The value at `path` ("coordinates.latitude") in a result; `_MISSING` if absent or ambiguous.

    A list result is read through: the path is looked up in each element and must give the same
    value in all elements that have it. Picking the first of several differing candidates would
    be a guess at which one the original conversation used (44 such references in complexfuncbench).
    """
    value = response
    for key in [k for k in path.split(".") if k]:
        if isinstance(value, list) and key.isdigit():
            value = value[int(key)] if int(key) < len(value) else _MISSING
        elif isinstance(value, list):
            found = [e[key] for e in value if isinstance(e, dict) and key in e]
            distinct = {json.dumps(f, sort_keys=True) for f in found}
            value = found[0] if len(distinct) == 1 else _MISSING
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            value = _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _substitute(value: Any, results: dict[str, Any]) -> Any:
    """`value` with every reference replaced by what it names; `_MISSING` if one cannot be resolved."""
    if isinstance(value, dict):
        out = {k: _substitute(v, results) for k, v in value.items()}
        return _MISSING if _MISSING in out.values() else out
    if isinstance(value, list):
        items = [_substitute(v, results) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else items
    if not isinstance(value, str) or not REF.search(value):
        return value
    whole = REF.fullmatch(value)
    if whole:  # the value itself, typed as the result holds it
        return resolve(results.get(whole.group(1), _MISSING), whole.group(2) or "")
    parts = [resolve(results.get(m.group(1), _MISSING), m.group(2) or "") for m in REF.finditer(value)]
    if any(p is _MISSING or isinstance(p, dict | list) for p in parts):
        return _MISSING
    pieces = iter(str(p) for p in parts)
    return REF.sub(lambda _: next(pieces), value)


def tool_result_text(response: Any, max_chars: int) -> str:
    """A result as a tool message holds it: JSON, cut at `max_chars` so prompts stay short."""
    text = json.dumps(response, ensure_ascii=False)
    return text if len(text) <= max_chars else text[:max_chars] + " ..."


def _visible(label: str, path: str, value: Any, texts: dict[str, str]) -> bool:
    """Whether a model reading the (cut) tool message could copy `value` from it."""
    keys = [k for k in path.split(".") if k and not k.isdigit()]
    shown = json.dumps(value, ensure_ascii=False)
    text = texts.get(label, "")
    return (f'"{keys[-1]}": {shown}' in text) if keys else (text == shown)


def second_turn(calls: list[dict[str, Any]], user_text: str, *, max_chars: int) -> SecondTurn | None:
    """Round one with its results and round two resolved, or None when there is no clean round two.

    Round two is every later call whose references and hidden literals round one's results cover,
    in order: all of them, as a model seeing those results would issue them together. None when a
    call of round one has no recorded result, a reference cannot be resolved, or a value round two
    needs does not survive the cut at `max_chars`.
    """
    first = first_round(calls, user_text)
    labelled = [calls[i] for i in first]
    if not labelled or any("response" not in c for c in labelled):
        return None
    results = {c.get("label", ""): c["response"] for c in labelled}
    cut = [tool_result_text(c["response"], max_chars) for c in labelled]  # one tool message per call
    texts = {c.get("label", ""): t for c, t in zip(labelled, cut, strict=True)}
    known = {str(s) for c in labelled for s in _scalars(c["response"])}
    shown = "\n".join(cut)
    earlier: set[str] = set()
    second = []
    for i, call in enumerate(calls):
        hidden = _hidden(call, earlier, user_text)
        earlier.update(str(s) for s in _scalars(call.get("response")))
        refs = references(call.get("arguments"))
        if i in first or any(label not in results for label, _ in refs) or any(str(v) not in known for v in hidden):
            continue  # round one itself, or it needs a later round's result
        arguments = _substitute(call.get("arguments") or {}, results)
        if arguments is _MISSING or not all(
                _visible(label, path, resolve(results[label], path), texts) for label, path in refs):
            return None
        if any(str(v) not in shown for v in hidden):
            return None
        second.append({**call, "arguments": arguments})
    return SecondTurn(labelled, cut, second) if second else None
