"""A non-private warm-up on public examples before DP-LoRA: the answer's format without privacy spent.

Under DP-SGD each step's signal is bounded by the clip norm and its noise is not, and a small
model that has never answered in the tool-call format (SmolLM2's base accuracy is 0.0 on the
customer-service router and on public function-calling data alike) spends much of its private
steps learning that format. The format, and how to pick one of the offered tools and fill its
arguments from the user's words, can be learned from data that holds nobody's records:
- public function-calling data (train/public_data.py: NESTFUL's glaive, SGD, executable and
  ComplexFuncBench requests, many tools, real phrasing, parallel calls, tool results), with any
  request that also appears in the job's eval or val split left out;
- the service's own tool definitions: each becomes a few requests written from its description
  ("Look up the status of an order", "I need to look up ...") answered by a call with placeholder
  arguments. Measured on the simulated router (SmolLM2-135M, 400 training records, epsilon 8):
  the warm-up alone 0.30 function-name accuracy, DP-LoRA after it 0.92, from scratch 0.79.

What counts as public (docs/governance.md): a tool definition is the service's configuration, sent
alike with many records; one is used only when at least `min_records` training records carry it,
so no single record decides what the warm-up sees. Records' user texts, tool results and answers
are never used. The privacy accounting (train/dp.py) covers the private records as before.
"""
from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import torch

from train.data import pad_rows, tokenize_example
from train.public_data import public_examples as public_data_examples
from train.run_config import TrainRun
from train.tail import AnswerLoss

PHRASINGS = ("{d}", "I need to {l}", "Please {l}.", "Can you {l}?")
MAX_TOOLS = 6  # a synthetic request offers its tool and up to this many of the service's others
# Longer public examples (a long tool list, a tool result) are left out: a step's cost follows its
# longest row (SmolLM2, 8 rows on 2 CPUs: 1.6 s at 256 tokens, 2.8 s at 384, 7.2 s at 768). Of 800
# public examples 440 fit: single and parallel calls from every source, few multi-turn ones (7).
WARMUP_TOKENS = 384


def service_tools(examples: list[dict[str, Any]], *, min_records: int) -> list[dict[str, Any]]:
    """The tool definitions (exactly as sent) at least `min_records` of the tool-calling `examples` carry."""
    counts: Counter[bytes] = Counter()
    first: dict[bytes, dict[str, Any]] = {}  # as sent: its properties' order is the order calls are written in
    for e in examples:
        if e.get("workload_type") == "tool_calling":
            keys = {orjson.dumps(t, option=orjson.OPT_SORT_KEYS): t for t in e["record"]["request"].get("tools") or []}
            counts.update(keys.keys())
            for key, tool in keys.items():
                first.setdefault(key, tool)
    return [first[key] for key, n in sorted(counts.items()) if n >= min_records]


def service_examples(examples: list[dict[str, Any]], *, min_records: int, seed: int = 0) -> list[dict[str, Any]]:
    """Training examples (the curated format) written from the service's shared tool definitions."""
    tools = service_tools(examples, min_records=min_records)
    rng, out = random.Random(seed), []
    for tool in tools:
        function = tool.get("function") or {}
        described = str(function.get("description") or "").strip().rstrip(".")
        if not function.get("name") or not described:
            continue
        lowered = described[0].lower() + described[1:]
        arguments = {name: f"<{name}>" for name in (function.get("parameters") or {}).get("properties") or {}}
        call = {"id": "call_0", "type": "function", "function": {"name": function["name"], "arguments": arguments}}
        others = [t for t in tools if t is not tool]
        offered = [tool, *rng.sample(others, min(MAX_TOOLS - 1, len(others)))]
        rng.shuffle(offered)
        for phrasing in PHRASINGS:
            text = phrasing.format(d=described, l=lowered)
            record = {"request": {"tools": offered, "messages": [{"role": "user", "content": text}]},
                      "response": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                          "role": "assistant", "content": None, "tool_calls": [call]}}]}}
            out.append({"id": f"public-{len(out)}", "record": record, "workload_type": "tool_calling",
                        "tool": function["name"], "user_text": text})
    return out


def _user_texts(path: Path) -> list[str]:
    """The user texts of a split file (its last user turn per example), to keep out of the warm-up."""
    if not path.exists():
        return []
    return [e.get("user_text") or "" for e in json.loads(path.read_text())]


def warm_up(peft_model: Any, tokenizer: Any, examples: list[dict[str, Any]], *, steps: int, batch_size: int,
            learning_rate: float, max_seq_len: int, device: torch.device, seed: int,
            autocast: Any = None) -> dict[str, Any]:
    """`steps` plain (non-private) AdamW steps of the adapter on `examples` of at most WARMUP_TOKENS tokens;
    what it did, for the report."""
    rows = [tokenize_example(tokenizer, e, max_seq_len) for e in examples]
    rows = [r for r in rows if len(r["input_ids"]) <= WARMUP_TOKENS] or rows
    ids, labels, mask = pad_rows(rows, tokenizer.pad_token_id)
    module = AnswerLoss(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)  # every DP worker warms up alike
    losses = []
    peft_model.train()
    for _ in range(steps):
        batch = torch.randperm(len(ids), generator=generator)[:batch_size]
        with autocast or contextlib.nullcontext():  # None: float32
            loss = module(ids[batch].to(device), labels[batch].to(device), mask[batch].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"public_examples": len(rows), "public_steps": steps,
            "public_loss": round(sum(losses[-3:]) / max(1, len(losses[-3:])), 4) if losses else None}


def public_warm_up(run: TrainRun, peft_model: Any, tokenizer: Any, device: torch.device, *,
                   resuming: bool, autocast: Any = None) -> dict[str, Any]:
    """The warm-up a run asks for (`training.public_warmup`): DP tool-calling runs only, and never
    on a resumed run, whose checkpoint holds the adapter as it was. Requests of the job's eval and
    val splits (`run.held_out_paths`) never reach it, whatever public data they came from."""
    warmup = run.training.public_warmup
    if resuming or not run.private or not warmup.steps:
        return {"public_examples": 0, "public_steps": 0}
    train = json.loads(run.train_path.read_text())
    if not any(e.get("workload_type") == "tool_calling" for e in train):
        return {"public_examples": 0, "public_steps": 0}
    examples = service_examples(train, min_records=warmup.min_records, seed=run.seed)
    held_out = [t for path in run.held_out_paths for t in _user_texts(path)]
    examples += public_data_examples(warmup.sources, exclude_user_texts=held_out,
                                     limit=warmup.max_public_examples, seed=run.seed)
    if not examples:
        return {"public_examples": 0, "public_steps": 0}
    return warm_up(peft_model, tokenizer, examples, steps=warmup.steps, batch_size=warmup.batch_size,
                   learning_rate=run.training.learning_rate, max_seq_len=run.training.max_seq_len, device=device,
                   seed=run.seed, autocast=autocast)
