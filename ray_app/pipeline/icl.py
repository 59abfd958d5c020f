"""In-context examples drawn from the training split, fitted to a token budget.

Two strategies (the NVIDIA blueprint's names, `icl_config.example_selection`):
- `uniform_distribution`: one fixed set for every query, round-robin over the tools so
  each tool is shown before any is shown twice;
- `semantic_similarity`: per query, the training examples whose user turns are nearest
  by embedding cosine (MiniLM in a job; any `embed` function here).
This module does pure selection: the caller supplies `cost(example) -> tokens` (it knows
the tokenizer and how an example is rendered) and `embed(texts) -> unit vectors`.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]


def fit_budget(candidates: Sequence[Example], *, max_examples: int, budget_tokens: int,
               cost: Callable[[Example], int]) -> list[Example]:
    """Take candidates in order while they fit; an example too long to fit is skipped, not truncated."""
    chosen, used = [], 0
    for example in candidates:
        if len(chosen) >= max_examples:
            break
        tokens = cost(example)
        if used + tokens <= budget_tokens:
            chosen.append(example)
            used += tokens
    return chosen


def select_uniform(pool: Sequence[Example], *, max_examples: int, budget_tokens: int,
                   cost: Callable[[Example], int], seed: int | None = None) -> list[Example]:
    """Round-robin over tools (shuffled within each), then fitted to the budget."""
    rng = random.Random(seed)
    by_tool: dict[Any, list[Example]] = defaultdict(list)
    for example in pool:
        by_tool[example.get("tool")].append(example)
    queues = [rng.sample(members, len(members)) for _, members in sorted(by_tool.items(), key=lambda kv: str(kv[0]))]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop())
    return fit_budget(order, max_examples=max_examples, budget_tokens=budget_tokens, cost=cost)


class SemanticSelector:
    """Nearest training examples to each query by cosine similarity of the user turns."""

    def __init__(self, pool: Sequence[Example], embed: Callable[[list[str]], np.ndarray]):
        self.pool = list(pool)
        self.embed = embed
        self.vectors = _unit(embed([e["user_text"] for e in self.pool])) if self.pool else np.zeros((0, 1))

    def select(self, queries: Sequence[Example], *, max_examples: int, budget_tokens: int,
               cost: Callable[[Example], int]) -> list[list[Example]]:
        if not self.pool:
            return [[] for _ in queries]
        scores = _unit(self.embed([q["user_text"] for q in queries])) @ self.vectors.T
        out = []
        for query, row in zip(queries, scores, strict=True):
            # The query itself is never its own example (it may sit in the pool when evaluating train data).
            ranked = [self.pool[i] for i in np.argsort(-row, kind="stable") if self.pool[i]["id"] != query["id"]]
            # Nearest last: it then sits right before the query, where small models attend most.
            chosen = fit_budget(ranked, max_examples=max_examples, budget_tokens=budget_tokens, cost=cost)
            out.append(chosen[::-1])
        return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
