"""Batched greedy generation with its own throughput measurement.

Prompts are sorted by length before batching (less padding, fewer wasted FLOPs), padded
on the left (every row's next token sits at the same right edge) and truncated on the
left (the question at the end matters more than the oldest context). The stats it
returns are what the cost stage prices: generated tokens per second of wall time, and
the p50 latency a request sees, which is its whole batch's wall time.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int = 8, max_new_tokens: int = 48,
             max_prompt_tokens: int = 512, should_stop: Callable[[], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(outputs in prompt order, stats). `should_stop()` may raise to cancel between batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    latencies: list[float] = []
    generated = 0
    started = time.perf_counter()
    stop_ids = _stop_ids(tokenizer)
    tokenizer.truncation_side = "left"
    for first in range(0, len(order), batch_size):
        if should_stop is not None:
            should_stop()
        rows = order[first:first + batch_size]
        batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_prompt_tokens, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - t0
        new = out[:, batch["input_ids"].shape[1]:]
        for row, tokens in zip(rows, new, strict=True):
            kept = _until_stop(tokens.tolist(), stop_ids)
            generated += len(kept)
            outputs[row] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            latencies.append(elapsed)
        if on_batch is not None:
            on_batch(len(rows))
    seconds = time.perf_counter() - started
    stats = {"prompts": len(prompts), "batch_size": batch_size, "generated_tokens": generated,
             "seconds": round(seconds, 3), "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
             "latency_ms_p50": 1000 * statistics.median(latencies) if latencies else 0.0}
    return outputs, stats


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):  # chat templates' end-of-turn markers
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
