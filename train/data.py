"""Training examples as tensors: prompt tokens (no loss) then answer tokens (the loss).

The answer is the production model's answer (for tool calls its first call as compact
JSON) closed by the model's own end-of-turn token, so the fine-tuned model learns to stop.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evals.prompts import build_messages, end_of_turn_ids, render_prompt, target_of

IGNORE = -100  # label of the prompt and padding tokens: no loss there


def end_of_turn(tokenizer: Any) -> str:
    """What closes an assistant turn in the model's own template (generation stops on each of these)."""
    return next(iter(end_of_turn_ids(tokenizer)), tokenizer.eos_token or "")


def tokenize_example(tokenizer: Any, example: dict[str, Any], max_seq_len: int) -> dict[str, list[int]]:
    """Prompt tokens (labels ignored) + answer tokens; the prompt is cut from the left to fit."""
    prompt = render_prompt(tokenizer, build_messages(example))
    answer = target_of(example["record"], example["workload_type"]) + end_of_turn(tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_seq_len // 2]
    p_ids = p_ids[-(max_seq_len - len(a_ids)):]
    return {"input_ids": p_ids + a_ids, "labels": [IGNORE] * len(p_ids) + a_ids}


def pad_rows(rows: list[dict[str, list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, mask), right-padded to the longest row: Opacus's Poisson sampler needs uniform shapes."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def load_split(path: str | Path, tokenizer: Any, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A split file written by the job's curate stage, tokenized and padded."""
    examples = json.loads(Path(path).read_text())
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return pad_rows([tokenize_example(tokenizer, e, max_seq_len) for e in examples], tokenizer.pad_token_id)
