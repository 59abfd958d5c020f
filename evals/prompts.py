"""Turning curated records into prompts and targets, and model outputs back into tool calls.

Small models on 2 CPUs pay for every prompt token twice (training and generation), so
tools are rendered compactly, one `name(arg1, arg2)` per line, instead of full JSON
schemas. The target of a tool-calling record is the production answer's first tool call
as compact JSON `{"name": ..., "arguments": {...}}`; a generic record's target is the
production answer's text.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")  # chat templates' end-of-turn markers
TOOL_INSTRUCTION = "Call one tool. Answer only with JSON: {\"name\": tool, \"arguments\": {...}}"
GENERIC_INSTRUCTION = "Answer briefly."


def render_tools(tools: Sequence[dict[str, Any]] | None) -> str:
    """`name(arg1, arg2)` per tool, required arguments first."""
    lines = []
    for tool in tools or []:
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {}
        props = list((params.get("properties") or {}).keys())
        required = [p for p in params.get("required") or [] if p in props]
        ordered = required + [p for p in props if p not in required]
        lines.append(f"{fn.get('name', '?')}({', '.join(ordered)})")
    return "\n".join(lines)


def render_tool_call(call: dict[str, Any]) -> str:
    """Compact JSON of one call, arguments as an object whatever form they arrived in."""
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = {"_raw": args}
    return json.dumps({"name": call.get("name"), "arguments": args}, separators=(", ", ": "))


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
            content = "\n".join(render_tool_call(c["function"]) for c in message["tool_calls"])
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
        return render_tool_call(message["tool_calls"][0]["function"])
    return text_of(message.get("content")).strip()


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's output that looks like a call, or None.

    Accepts the OpenAI nesting (`{"function": {...}}`) and a `parameters` key for
    `arguments`, since small models mix these up; string arguments are parsed as JSON.
    """
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            obj = obj.get("function", obj) if isinstance(obj.get("function"), dict) else obj
            if isinstance(obj.get("name"), str):
                args = obj.get("arguments", obj.get("parameters", {}))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass
                return {"name": obj["name"], "arguments": args}
        start = text.find("{", start + 1)
    return None
