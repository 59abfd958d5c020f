"""Eval / train / val splits, stratified by the tool the production answer called.

The eval set is drawn first (`data_split.eval_size`), so it is the same size whatever
else changes; the rest is split into train and val by `val_ratio`. Stratifying keeps a
rare tool from vanishing out of one side: each tool gets its share by largest remainder,
and every tool with at least two examples keeps one on each side of the cut.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from ray_app.config import DataSplitConfig
from ray_app.errors import JobFailed


def stratified_take(items: list[dict[str, Any]], k: int, rng: random.Random,
                    key: str = "tool") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(k items taken in proportion to each `key` group, the rest); both shuffled."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[item.get(key)].append(item)
    for members in groups.values():
        rng.shuffle(members)
    n = len(items)
    k = max(0, min(k, n))
    exact = {g: k * len(m) / n for g, m in groups.items()} if n else {}
    quota = {g: int(q) for g, q in exact.items()}
    # Largest remainders get the seats left over; ties broken by group order for determinism.
    leftovers = sorted(groups, key=lambda g: (-(exact[g] - quota[g]), str(g)))
    for g in leftovers[: k - sum(quota.values())]:
        quota[g] += 1
    taken, rest = [], []
    for g, members in groups.items():
        taken += members[: quota[g]]
        rest += members[quota[g]:]
    rng.shuffle(taken)
    rng.shuffle(rest)
    return taken, rest


def split_examples(examples: list[dict[str, Any]], config: DataSplitConfig) -> dict[str, list[dict[str, Any]]]:
    """{"eval", "train", "val"}; raises JobFailed when nothing would be left to train on."""
    rng = random.Random(config.random_seed)
    eval_size = min(config.eval_size, len(examples) // 2)  # never spend more than half on evaluation
    if eval_size < 1 or len(examples) - eval_size < 2:
        raise JobFailed(f"{len(examples)} curated records are too few to split into eval, train and val")
    eval_set, rest = stratified_take(examples, eval_size, rng)
    val_size = max(1, round(len(rest) * config.val_ratio))
    val, train = stratified_take(rest, val_size, rng)
    return {"eval": eval_set, "train": train, "val": val}
