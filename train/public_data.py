"""Public function-calling data as Flywheel log records: NESTFUL (Apache-2.0, the `nestful-wrapper` package).

The warm-up before DP-LoRA (train/public.py) and a realistic benchmark want traffic that looks like a
real service's: a user's request, the short tool list the service sends with it, and the production
answer as OpenAI tool calls. NESTFUL holds such requests from four sources, each with its tool specs:
glaive (169 requests, 64 tools), sgd (46, 30), executable (85, 39) and complexfuncbench (1,000 booking
requests, 40 tools, with every call's real result). Each request is a sequence of calls; train/nestful.py
cuts it into turns:
  single-turn (shape 0): the user's text, answered by every call that needs no earlier result (one
      call, or several in parallel);
  multi-turn (shape 1, complexfuncbench only): those calls and their results (cut to
      TOOL_RESULT_CHARS) as history, answered by the calls that needed them, references resolved.
Records are built once per process and source (complexfuncbench's two 100 MB files take about 2 s)
and kept as JSON bytes, so the parsed files are freed and every caller gets its own copy.
The package's top-level `data_v1` is found with importlib and never imported.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from ray_app.pipeline.curation import _with_parsed_arguments  # curated records hold parsed arguments
from ray_app.schemas import check_record
from train.nestful import first_round, second_turn

SOURCES: dict[str, str] = {  # name -> data_v1/<stem>-{data,spec}.json
    "glaive": "non-executable/non-executable-glaive",
    "sgd": "non-executable/non-executable-sgd",
    "executable": "executable/executable",
    "complexfuncbench": "complexfuncbench/complexfuncbench",
}
MAX_TOOLS = 4  # real services send their own small lists, not a catalogue
TOOL_RESULT_CHARS = 600  # a tool message's share of a small model's prompt
CLIENT_ID = "public"
SINGLE, MULTI_TURN = 0, 1  # the last part of a record's id

_TYPES = {"int": "integer", "integer": "integer", "float": "number", "double": "number", "number": "number",
          "bool": "boolean", "boolean": "boolean", "list": "array", "array": "array", "dict": "object",
          "object": "object", "str": "string", "string": "string"}


def _schema(param: dict[str, Any]) -> dict[str, Any]:
    """One NESTFUL parameter as JSON Schema. Sources differ: sgd has no types (strings), executable has
    "Date (yyyy-mm-dd)" (a string), glaive nests objects whose members say `"required": true`."""
    out: dict[str, Any] = {"type": _TYPES.get(str(param.get("type") or "string").lower(), "string")}
    if isinstance(param.get("description"), str) and param["description"].strip():
        out["description"] = param["description"].strip()
    enum = param.get("allowed_values") or param.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str | int | float) for v in enum):
        out["enum"] = list(dict.fromkeys(enum))
    if out["type"] == "array" and isinstance(param.get("items"), dict):
        out["items"] = _schema(param["items"])
    if out["type"] == "object" and isinstance(param.get("properties"), dict) and param["properties"]:
        out.update(_object(param["properties"], param.get("required")))
    return out


def _object(members: dict[str, Any], required: Any) -> dict[str, Any]:
    """`properties` and `required` of an object schema; `required` either a list or per member."""
    properties = {k: _schema(v if isinstance(v, dict) else {}) for k, v in members.items()}
    if isinstance(required, list):
        names = [k for k in required if k in properties]
    else:
        names = [k for k, v in members.items() if isinstance(v, dict) and v.get("required") is True
                 and not v.get("optional")]
    return {"properties": properties, "required": names}


def tool_spec(spec_item: dict[str, Any]) -> dict[str, Any]:
    """A NESTFUL spec item as an OpenAI tool (its query parameters as a JSON Schema object)."""
    parameters = {"type": "object", **_object(spec_item.get("query_parameters") or {}, None)}
    return {"type": "function", "function": {"name": spec_item["name"],
                                             "description": str(spec_item.get("description") or "").strip(),
                                             "parameters": parameters}}


def data_dir() -> Path:
    """Where the `nestful-wrapper` package put `data_v1` (located, never imported)."""
    found = importlib.util.find_spec("data_v1")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("public data needs the nestful-wrapper package (pip install nestful-wrapper)")
    return Path(next(iter(found.submodule_search_locations)))


def load_source(name: str) -> list[dict[str, Any]]:
    """One source's requests as log records (single-turn, then multi-turn where there is one, per request)."""
    if name not in SOURCES:
        raise ValueError(f"unknown public source {name!r}; known: {', '.join(SOURCES)}")
    return orjson.loads(_built(name))


@functools.lru_cache(maxsize=len(SOURCES))
def _built(name: str) -> bytes:
    root = data_dir() / SOURCES[name]
    data = orjson.loads(root.with_name(root.name + "-data.json").read_bytes())
    tools = {s["name"]: tool_spec(s) for s in orjson.loads(root.with_name(root.name + "-spec.json").read_bytes())}
    return orjson.dumps([r for i, item in enumerate(data) for r in _records(name, i, item, tools)])


def _records(name: str, index: int, item: dict[str, Any], tools: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of one request: calls of tools the spec lacks are dropped, and so is "var_result"
    (NESTFUL's final answer, not a tool)."""
    text = str(item.get("input") or "").strip()  # complexfuncbench's inputs start with a space
    calls = [c for c in item.get("output") or [] if c.get("name") in tools]
    if not text or not calls:
        return []
    names = [c["name"] for c in calls]
    user = {"role": "user", "content": text}
    answer = [calls[i] for i in first_round(calls, text)]
    out = [_record(name, index, SINGLE, [user], answer, _tool_list(answer, names, tools, name, index, SINGLE))]
    turn = second_turn(calls, text, max_chars=TOOL_RESULT_CHARS)
    if turn is not None:
        history = [user, _assistant(turn.first, 0), *({"role": "tool", "tool_call_id": f"call_{i}", "content": t}
                                                      for i, t in enumerate(turn.results))]
        listed = _tool_list(turn.first + turn.second, names, tools, name, index, MULTI_TURN)
        out.append(_record(name, index, MULTI_TURN, history, turn.second, listed, start=len(turn.first)))
    return [r for r in out if r is not None]


def _tool_list(called: list[dict[str, Any]], sequence: list[str], tools: dict[str, dict[str, Any]], name: str,
               index: int, shape: int) -> list[dict[str, Any]] | None:
    """The called tools plus distractors, 1 to MAX_TOOLS in all, shuffled; None if the calls need more.

    Distractors come first from the request's own later steps (the service that booked the hotel
    also offers the hotel's reviews), then from the rest of the source's spec: the model must pick
    the step the conversation is at, not just the one tool that looks related.
    """
    used = list(dict.fromkeys(c["name"] for c in called))
    if len(used) > MAX_TOOLS:
        return None
    rng = random.Random(f"nestful-{name}-{index}-{shape}")  # a string seed: the same in every process
    extra = rng.randint(0, MAX_TOOLS - len(used))
    own = [n for n in dict.fromkeys(sequence) if n not in used]
    others = sorted(set(tools) - set(used) - set(own))
    rng.shuffle(own)
    rng.shuffle(others)
    chosen = used + (own + others)[:extra]
    rng.shuffle(chosen)
    return [tools[n] for n in chosen]


def _assistant(calls: list[dict[str, Any]], start: int) -> dict[str, Any]:
    """An assistant turn of tool calls, arguments as JSON strings as the OpenAI API returns them."""
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{start + i}", "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments") or {}, ensure_ascii=False)}}
        for i, c in enumerate(calls)]}


def _record(name: str, index: int, shape: int, messages: list[dict[str, Any]], answer: list[dict[str, Any]],
            tools: list[dict[str, Any]] | None, *, start: int = 0) -> dict[str, Any] | None:
    if not answer or tools is None:
        return None
    return {"id": f"nestful-{name}-{index}-{shape}", "workload_id": f"nestful-{name}", "client_id": CLIENT_ID,
            "workload_type": "tool_calling",
            "request": {"model": "production", "messages": messages, "tools": tools},
            "response": {"choices": [{"index": 0, "finish_reason": "tool_calls",
                                      "message": _assistant(answer, start)}]}}


def normalize_text(text: str) -> str:
    """How user texts are compared across data sets: stripped, lower-cased, whitespace collapsed."""
    return " ".join(text.split()).lower()


def public_examples(sources: Iterable[str], *, exclude_user_texts: Iterable[str] = frozenset(),
                    limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Curated examples (ray_app/pipeline/curation.py's format) from public sources, in a seeded order.

    An example whose user text is in `exclude_user_texts` (compared normalized) is dropped: a
    benchmark passes its eval requests so none of them reaches a warm-up. `limit`: the first
    `limit` of the shuffled examples, so a small warm-up still mixes the sources.
    """
    excluded = {normalize_text(t) for t in exclude_user_texts}
    examples = []
    for source in sources:
        for raw in load_source(source):
            check_record(raw)  # built here, so a failure is a bug in this module: let it raise
            record = _with_parsed_arguments(raw)
            assert record is not None, raw["id"]  # its arguments were written by json.dumps
            users = [str(m.get("content") or "").strip() for m in record["request"]["messages"]
                     if m["role"] == "user"]
            if normalize_text(users[-1]) in excluded:
                continue
            tool = record["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"]
            examples.append({"id": record["id"], "record": record, "workload_type": "tool_calling",
                             "tool": tool, "user_text": users[-1]})
    random.Random(seed).shuffle(examples)
    return examples if limit is None else examples[:limit]
