"""Turning curated records into prompts and targets, and model outputs back into tool calls.

Small models on 2 CPUs pay for every prompt token twice (training and generation), so tools are
rendered as one compact signature a line, `name(city: string, unit?: "c"|"f") - Short description.`,
instead of full JSON schemas: the argument types, which are optional (`?`), the allowed values and
a short description are what a model needs to fill a call, and the whole list is held to a
character budget (descriptions are cut first). The target of a tool-calling record is the
production answer's tool calls, one compact JSON `{"name": ..., "arguments": {...}}` a line
(several for parallel calls), arguments in the tool schema's property order: the order
constrained decoding (evals/grammar.py) writes them in. A generic record's target is the
production answer's text.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")  # chat templates' end-of-turn markers
TOOL_INSTRUCTION = ("Call the tools the request needs. Answer only with JSON, one call a line: "
                    "{\"name\": tool, \"arguments\": {...}}")
GENERIC_INSTRUCTION = "Answer briefly."
TOOLS_BUDGET_CHARS = 1600  # ~400 tokens: the tool list never crowds out the conversation
DESCRIPTION_WORDS = 16


def _type_of(schema: dict[str, Any]) -> str:
    if schema.get("enum"):
        return "|".join(json.dumps(v) for v in schema["enum"][:8])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return "|".join(map(str, kind))
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"{_type_of(schema['items'])}[]"
    return str(kind)


def _short(text: Any, words: int) -> str:
    parts = str(text or "").split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def _signature(fn: dict[str, Any], words: int) -> str:
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    args = [f"{name}{'' if name in required else '?'}: {_type_of(spec if isinstance(spec, dict) else {})}"
            for name, spec in props.items()]
    line = f"{fn.get('name', '?')}({', '.join(args)})"
    described = _short(fn.get("description"), words)
    return f"{line} - {described}" if described and words else line


def render_tools(tools: Sequence[dict[str, Any]] | None, budget: int = TOOLS_BUDGET_CHARS) -> str:
    """One signature a line (see the module docstring); descriptions shortened, then dropped, to fit `budget`."""
    fns = [t.get("function", t) for t in tools or []]
    for words in (DESCRIPTION_WORDS, 8, 0):
        text = "\n".join(_signature(fn, words) for fn in fns)
        if len(text) <= budget:
            break
    return text


def _ordered(args: dict[str, Any], tool: dict[str, Any] | None) -> dict[str, Any]:
    """`args` with the tool schema's properties first, in its order (the order decoding is held to)."""
    props = list(((tool or {}).get("parameters") or {}).get("properties") or {})
    return {**{k: args[k] for k in props if k in args}, **{k: v for k, v in args.items() if k not in props}}


def render_tool_call(call: dict[str, Any], tool: dict[str, Any] | None = None) -> str:
    """Compact JSON of one call, arguments as an object whatever form they arrived in."""
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = {"_raw": args}
    if isinstance(args, dict):
        args = _ordered(args, tool)
    return json.dumps({"name": call.get("name"), "arguments": args}, separators=(", ", ": "))


def render_tool_calls(calls: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
    """A whole answer's calls (OpenAI `tool_calls` entries or bare functions), one a line."""
    by_name = {t.get("function", t).get("name"): t.get("function", t) for t in tools or []}
    functions = [c.get("function", c) for c in calls]
    return "\n".join(render_tool_call(f, by_name.get(f.get("name"))) for f in functions)


def text_of(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))


def conversation(record: dict[str, Any]) -> list[dict[str, str]]:
    """The request's messages as plain {role, content} turns (earlier tool calls rendered as JSON)."""
    turns = []
    for message in record["request"]["messages"]:
        role = message.get("role", "user")
        content = text_of(message.get("content"))
        if message.get("tool_calls"):
            content = render_tool_calls(message["tool_calls"], record["request"].get("tools"))
        if role in ("developer",):
            role = "system"
        if role == "function":
            role = "tool"
        turns.append({"role": role, "content": content})
    return turns


def build_messages(example: dict[str, Any], *, icl_examples: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
    """The chat for one curated example: one system turn (instruction, tools, examples), then the conversation."""
    turns = conversation(example["record"])
    system_parts = [t["content"] for t in turns if t["role"] == "system" and t["content"]]
    rest = [t for t in turns if t["role"] != "system"]
    if example["workload_type"] == "tool_calling":
        header = [TOOL_INSTRUCTION, "Tools:\n" + render_tools(example["record"]["request"].get("tools"))]
    else:
        header = [GENERIC_INSTRUCTION]
    # Examples as earlier user/assistant turns: small chat models imitate their own past answers far
    # more readily than an "Examples:" block inside the system prompt.
    shots = []
    for shot in icl_examples:
        shots += [{"role": "user", "content": last_user_text(shot["record"])},
                  {"role": "assistant", "content": target_of(shot["record"], shot["workload_type"])}]
    return [{"role": "system", "content": "\n".join(system_parts + header)}, *shots, *rest]


def last_user_text(record: dict[str, Any]) -> str:
    users = [text_of(m.get("content")) for m in record["request"]["messages"] if m.get("role") == "user"]
    return users[-1] if users else ""


def end_of_turn_ids(tokenizer: Any) -> dict[str, int]:
    """The end-of-turn markers this tokenizer has, in END_OF_TURN's order, with their ids.

    Looked up one at a time: `get_vocab()` builds the whole vocabulary (0.2 s for Gemma's 262k
    tokens), and training asks once per example."""
    found = {}
    for token in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id:
            found[token] = tid
    return found


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model's own chat template when it has one; a plain transcript otherwise (tiny test tokenizers)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
    return body + "<assistant>\n"


def target_of(record: dict[str, Any], workload_type: str) -> str:
    message = record["response"]["choices"][0]["message"]
    if workload_type == "tool_calling":
        return render_tool_calls(message["tool_calls"], record["request"].get("tools"))
    return text_of(message.get("content")).strip()


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Every JSON object in a model's output that looks like a call, in order.

    Accepts the OpenAI nesting (`{"function": {...}}`) and a `parameters` key for `arguments`,
    since small models mix these up; string arguments are parsed as JSON; a list of calls counts
    as its calls.
    """
    decoder, calls, start = json.JSONDecoder(), [], 0
    while (start := _next_json(text, start)) != -1:
        try:
            obj, end = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            start += 1
            continue
        found = [c for c in map(_as_call, obj if isinstance(obj, list) else [obj]) if c is not None]
        calls += found
        start += end if found else 1
    return calls


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """The first call in a model's output (see `parse_tool_calls`), or None."""
    calls = parse_tool_calls(text)
    return calls[0] if calls else None


def _next_json(text: str, start: int) -> int:
    brace, bracket = text.find("{", start), text.find("[", start)
    found = [i for i in (brace, bracket) if i != -1]
    return min(found) if found else -1


def _as_call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    obj = obj["function"] if isinstance(obj.get("function"), dict) else obj
    if not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": obj["name"], "arguments": args}
