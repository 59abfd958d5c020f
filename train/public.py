"""A non-private warm-up on public examples before DP-LoRA: the answer's format without privacy spent.

Under DP-SGD each step's signal is bounded by the clip norm and its noise is not, and a small
model that has never answered in the tool-call format (SmolLM2's base accuracy on the
customer-service router is 0.0) spends much of its private steps learning that format. The
format, and roughly which tool a request names, can be learned from data that holds nobody's
records: the service's own tool definitions. Each tool becomes a few requests written from its
description ("Look up the status of an order", "I need to look up ...") answered by a call with
placeholder arguments. Measured (SmolLM2-135M, 400 training records, epsilon 8, 100 eval
examples, the same split): the warm-up alone 0.30 function-name accuracy, DP-LoRA after it
0.92, DP-LoRA from scratch 0.79.

What counts as public: a tool list and a system prompt are the service's configuration, the same
in every record of a workload. One is used only when at least `min_share` of the training records
carry it, so no single record decides what the warm-up sees; records' user texts and answers are
never used. The privacy accounting (train/dp.py) covers the private records as before.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import torch

from train.data import pad_rows, tokenize_example
from train.tail import AnswerLoss

PHRASINGS = ("{d}", "I need to {l}", "Please {l}.", "Can you {l}?")


def _common(values: list[bytes], min_share: float) -> Any:
    """The value at least `min_share` of `values` hold (JSON bytes), parsed; None if there is none."""
    if not values:
        return None
    value, n = Counter(values).most_common(1)[0]
    return orjson.loads(value) if n >= min_share * len(values) else None


def public_examples(examples: list[dict[str, Any]], *, min_share: float) -> list[dict[str, Any]]:
    """Training examples (the curated format) written from the tool list most of `examples` share."""
    requests = [e["record"]["request"] for e in examples if e.get("workload_type") == "tool_calling"]
    tools = _common([orjson.dumps(r.get("tools") or [], option=orjson.OPT_SORT_KEYS) for r in requests], min_share)
    if not tools:
        return []
    systems = [orjson.dumps([m for m in r["messages"] if m.get("role") == "system"]) for r in requests]
    system = _common(systems, min_share) or []
    out = []
    for tool in tools:
        function = tool.get("function") or {}
        described = str(function.get("description") or "").strip().rstrip(".")
        if not function.get("name") or not described:
            continue
        lowered = described[0].lower() + described[1:]
        arguments = {name: f"<{name}>" for name in (function.get("parameters") or {}).get("properties") or {}}
        call = {"id": "call_0", "type": "function", "function": {"name": function["name"], "arguments": arguments}}
        for phrasing in PHRASINGS:
            text = phrasing.format(d=described, l=lowered)
            record = {"request": {"tools": tools, "messages": [*system, {"role": "user", "content": text}]},
                      "response": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                          "role": "assistant", "content": None, "tool_calls": [call]}}]}}
            out.append({"id": f"public-{len(out)}", "record": record, "workload_type": "tool_calling",
                        "tool": function["name"], "user_text": text})
    return out


def warm_up(peft_model: Any, tokenizer: Any, examples: list[dict[str, Any]], *, steps: int, batch_size: int,
            learning_rate: float, max_seq_len: int, device: torch.device, seed: int,
            autocast: Any = contextlib.nullcontext()) -> dict[str, Any]:
    """`steps` plain (non-private) AdamW steps of the adapter on `examples`; what it did, for the report."""
    ids, labels, mask = pad_rows([tokenize_example(tokenizer, e, max_seq_len) for e in examples],
                                 tokenizer.pad_token_id)
    module = AnswerLoss(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # every DP worker warms up alike
    losses = []
    peft_model.train()
    for _ in range(steps):
        rows = torch.randperm(len(ids), generator=generator)[:batch_size]
        with autocast:
            loss = module(ids[rows].to(device), labels[rows].to(device), mask[rows].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"public_examples": len(examples), "public_steps": steps,
            "public_loss": round(sum(losses[-3:]) / max(1, len(losses[-3:])), 4) if losses else None}


def public_warm_up(config: dict[str, Any], peft_model: Any, tokenizer: Any, device: torch.device, *,
                   resuming: bool, autocast: Any = contextlib.nullcontext()) -> dict[str, Any]:
    """The warm-up a training config asks for (train/lora.py's keys): DP runs only, and never on a
    resumed run, whose checkpoint holds the adapter as it was."""
    warmup = config.get("public_warmup") or {"steps": 0}  # absent: off
    examples = [] if resuming or not config["privacy"]["enabled"] or not warmup["steps"] else \
        public_examples(json.loads(Path(config["train_path"]).read_text()), min_share=warmup["min_share"])
    if not examples:
        return {"public_examples": 0, "public_steps": 0}
    return warm_up(peft_model, tokenizer, examples, steps=warmup["steps"], batch_size=warmup["batch_size"],
                   learning_rate=config["learning_rate"], max_seq_len=config["max_seq_len"], device=device,
                   seed=config["seed"], autocast=autocast)
