"""Batched greedy generation with its own throughput measurement.

Prompts are sorted by length before batching (less padding, fewer wasted FLOPs). When they share
a long head (an eval set of one workload: system prompt and tool list), evals/decode.py runs the
head once and decodes with continuous batching. Otherwise `model.generate` runs fixed batches,
padded on the left (every row's next token sits at the same right edge) and truncated on the left
(the question at the end matters more than the oldest context). The stats it returns are what the
cost stage prices: generated tokens per second of wall time, and the p50 latency a request sees
(from its prompt's first read to its last token; on the fixed-batch path, its whole batch's time).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from evals.decode import SharedHead, decode
from evals.prompts import end_of_turn_ids


def generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int = 8, max_new_tokens: int = 48,
             max_prompt_tokens: int = 512, should_stop: Callable[[], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(outputs in prompt order, stats). `should_stop()` may raise to cancel before a prompt starts;
    `on_batch(n)` is told as each n prompts end."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    started = time.perf_counter()
    stop_ids = _stop_ids(tokenizer)
    head = SharedHead.build(model, tokenizer, prompts, max_prompt_tokens, max_new_tokens=max_new_tokens)
    if head is not None:
        done = decode(model, head, order, slots=batch_size, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                      pad_id=tokenizer.pad_token_id, should_stop=should_stop, on_done=on_batch)
    else:
        done = _fixed_batches(model, tokenizer, prompts, order, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              max_prompt_tokens=max_prompt_tokens, stop_ids=stop_ids, should_stop=should_stop,
                              on_batch=on_batch)
    seconds = time.perf_counter() - started
    outputs = [tokenizer.decode(done[i][0], skip_special_tokens=True).strip() for i in range(len(prompts))]
    generated = sum(len(tokens) for tokens, _ in done.values())
    stats = {"prompts": len(prompts), "batch_size": batch_size, "generated_tokens": generated,
             "seconds": round(seconds, 3), "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
             "latency_ms_p50": 1000 * statistics.median(s for _, s in done.values()) if done else 0.0}
    return outputs, stats


def _fixed_batches(model: Any, tokenizer: Any, prompts: list[str], order: list[int], *, batch_size: int,
                   max_new_tokens: int, max_prompt_tokens: int, stop_ids: list[int],
                   should_stop: Callable[[], None] | None,
                   on_batch: Callable[[int], None] | None) -> dict[int, tuple[list[int], float]]:
    """`model.generate` on batches of `batch_size` in `order`: prompt -> (tokens, its batch's seconds)."""
    tokenizer.truncation_side = "left"
    done: dict[int, tuple[list[int], float]] = {}
    for first in range(0, len(order), batch_size):
        if should_stop is not None:
            should_stop()
        rows = order[first:first + batch_size]
        t0 = time.perf_counter()
        batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_prompt_tokens, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - t0
        for row, tokens in zip(rows, out[:, batch["input_ids"].shape[1]:], strict=True):
            done[row] = (_until_stop(tokens.tolist(), stop_ids), elapsed)
        if on_batch is not None:
            on_batch(len(rows))
    return done


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer).values()}
    return sorted(i for i in ids if i is not None)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
