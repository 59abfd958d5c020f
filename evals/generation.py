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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from evals.decode import SharedHead, decode, greedy
from evals.grammar import Constrainer, GrammarProcessor
from evals.prompts import end_of_turn_ids


def generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int = 8, max_new_tokens: int = 48,
             max_prompt_tokens: int = 512, grammars: Sequence[str | None] | None = None,
             ignore_stops: bool = False, should_stop: Callable[[], None] | None = None,
             on_batch: Callable[[int], None] | None = None,
             heads: dict[str, SharedHead] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(outputs in prompt order, stats). `grammars[i]` constrains prompt i's answer (evals/grammar.py;
    None or absent: free; `ignore_stops`: every prompt runs to `max_new_tokens`, as `cost_probe` needs).
    `should_stop()` may raise to cancel before a prompt starts; `on_batch(n)` is
    told as each n prompts end. `heads`: {"last": a SharedHead} kept between calls (a server's), reused
    when the prompts start with it and replaced by a new one built here."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    started = time.perf_counter()
    stop_ids = [] if ignore_stops else _stop_ids(tokenizer)
    constrainer = None
    if grammars is not None and any(grammars):
        constrainer = Constrainer(tokenizer, grammars, vocab_size=model.get_output_embeddings().out_features,
                                  stop_ids=stop_ids)
    head = SharedHead.build(model, tokenizer, prompts, max_prompt_tokens, max_new_tokens=max_new_tokens,
                            known=heads.get("last") if heads is not None else None)
    if heads is not None and head is not None:
        heads["last"] = head
    if head is not None:
        done = decode(model, head, order, slots=batch_size, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                      pad_id=tokenizer.pad_token_id, should_stop=should_stop, on_done=on_batch,
                      pick=constrainer.pick if constrainer else greedy)
    else:
        done = _fixed_batches(model, tokenizer, prompts, order, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              max_prompt_tokens=max_prompt_tokens, stop_ids=stop_ids, should_stop=should_stop,
                              on_batch=on_batch, constrainer=constrainer)
    seconds = time.perf_counter() - started
    outputs = [tokenizer.decode(done[i][0], skip_special_tokens=True).strip() for i in range(len(prompts))]
    generated = sum(len(tokens) for tokens, _ in done.values())
    stats = {"prompts": len(prompts), "batch_size": batch_size, "generated_tokens": generated,
             "seconds": round(seconds, 3), "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
             "latency_ms_p50": 1000 * statistics.median(s for _, s in done.values()) if done else 0.0,
             "constrained": sum(1 for m in constrainer.matchers if m is not None) if constrainer else 0,
             "max_new_tokens": max_new_tokens, "new_tokens": [len(done[i][0]) for i in range(len(prompts))]}
    return outputs, stats


def _fixed_batches(model: Any, tokenizer: Any, prompts: list[str], order: list[int], *, batch_size: int,
                   max_new_tokens: int, max_prompt_tokens: int, stop_ids: list[int],
                   should_stop: Callable[[], None] | None, on_batch: Callable[[int], None] | None,
                   constrainer: Constrainer | None = None) -> dict[int, tuple[list[int], float]]:
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
        processors = LogitsProcessorList()
        if constrainer is not None:
            processors.append(GrammarProcessor(constrainer, rows, batch["input_ids"].shape[1], stop_ids))
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, logits_processor=processors,
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


# A model's cost from a fixed probe that other work on the machine cannot swing.
# An evaluation's own throughput is a poor price: it depends on how long that model's answers
# happened to be and on whatever else shared the CPUs at the time (one job read 76 tokens/s for a
# model in one evaluation and 4.9 in another, with the candidates' training beside it). The probe
# decodes the same prompts for exactly `new_tokens` tokens each (stop tokens ignored), `repeats`
# times, and reports the median and the range of each figure:
#
# - `cpu_tokens_per_second`: tokens per second of this process's CPU time. Time another process
#   holds a core is not ours and does not count, so load moves this far less than wall time; on a
#   CPU it is what the price is computed from (you pay for the CPU-seconds a token takes).
# - `tokens_per_second`: tokens per second of wall time, what a caller sees (and the GPU's price).
PROBE_PROMPTS = 8
PROBE_TOKENS = 32
REPEATS = 3


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 2), "range": [round(min(values), 2), round(max(values), 2)]}


def cost_probe(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, new_tokens: int = PROBE_TOKENS,
               repeats: int = REPEATS, max_prompt_tokens: int = 512) -> dict[str, Any]:
    """Decode the first PROBE_PROMPTS of `prompts` `repeats` times; medians and ranges of the rates."""
    probe = prompts[:PROBE_PROMPTS]
    wall, cpu, latency = [], [], []
    for _ in range(repeats):
        started_cpu = time.process_time()
        _, stats = generate(model, tokenizer, probe, batch_size=batch_size, max_new_tokens=new_tokens,
                            max_prompt_tokens=max_prompt_tokens, ignore_stops=True)
        cpu_seconds = time.process_time() - started_cpu
        wall.append(stats["tokens_per_second"])
        cpu.append(stats["generated_tokens"] / cpu_seconds if cpu_seconds > 0 else 0.0)
        latency.append(stats["latency_ms_p50"])
    return {"prompts": len(probe), "new_tokens": new_tokens, "repeats": repeats, "batch_size": batch_size,
            "tokens_per_second": _summary(wall), "cpu_tokens_per_second": _summary(cpu),
            "latency_ms_p50": _summary(latency)}
