"""Batched greedy generation with its own throughput measurement.

Prompts are sorted by length before batching (less padding, fewer wasted FLOPs), padded
on the left (every row's next token sits at the same right edge) and truncated on the
left (the question at the end matters more than the oldest context). The stats it
returns are what the cost stage prices: generated tokens per second of wall time, and
the p50 latency a request sees, which is its whole batch's wall time.

Eval prompts of one workload share a long head (system prompt and tool list, about half of each
prompt), and on CPU reading the prompt costs more than writing the short answer. So the shared
head runs through the model once; every batch starts from a copy of its keys and values and
reads only its own tails, padded on the left of the tail (between head and tail, masked out;
positions come from the mask, so each row's tokens keep the positions they would have had).
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
    head = _SharedHead.build(model, tokenizer, prompts, max_prompt_tokens)
    for first in range(0, len(order), batch_size):
        if should_stop is not None:
            should_stop()
        rows = order[first:first + batch_size]
        t0 = time.perf_counter()
        if head:
            batch = head.batch(rows, tokenizer.pad_token_id)
        else:
            batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_prompt_tokens, add_special_tokens=False)
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


class _SharedHead:
    """The prompts' common first tokens, run once, and each prompt's own tail."""

    MIN_TOKENS = 16  # below this the copy costs more than it saves

    def __init__(self, head: list[int], tails: list[list[int]], keys_values: list[tuple[torch.Tensor, ...]]):
        self.head, self.tails, self.keys_values = head, tails, keys_values

    @classmethod
    def build(cls, model: Any, tokenizer: Any, prompts: list[str], max_prompt_tokens: int) -> _SharedHead | None:
        if len(prompts) < 2 or any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            return None  # sliding-window layers keep their own cache type: the plain path
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if max(len(i) for i in ids) > max_prompt_tokens:
            return None  # left truncation would cut into the head
        n = min(len(i) for i in ids) - 1  # every prompt keeps a token of its own
        shared = next((k for k in range(n) if any(i[k] != ids[0][k] for i in ids)), n)
        if shared < cls.MIN_TOKENS:
            return None
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids[0][:shared]]), past_key_values=cache, use_cache=True)
        return cls(ids[0][:shared], [i[shared:] for i in ids], [(layer.keys, layer.values) for layer in cache.layers])

    def batch(self, rows: list[int], pad_id: int) -> dict[str, Any]:
        from transformers import DynamicCache

        tails = [self.tails[r] for r in rows]
        width = max(len(t) for t in tails)
        ids = [self.head + [pad_id] * (width - len(t)) + t for t in tails]
        mask = [[1] * len(self.head) + [0] * (width - len(t)) + [1] * len(t) for t in tails]
        n = len(rows)
        past = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.keys_values])
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "past_key_values": past}

