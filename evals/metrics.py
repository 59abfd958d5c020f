"""Scores of candidate outputs against the production answers, each with n and a confidence interval.

Tool calling (an answer may hold several calls: parallel calls are matched as a set, order ignored):
- function_name_accuracy: the answer calls exactly the production answer's functions (as a
  multiset of names; for one call, its name matches exactly).
- function_args_accuracy: the whole calls match, names AND arguments equal after
  normalization (see `normalize_value`): key order is ignored, and a string that is
  exactly a JSON number or boolean equals that number/boolean ("5" == 5, "true" == true,
  but "05" != 5 and "A12" != "a12"), because production models and tools disagree on
  quoting scalars while the value the tool receives is the same. Strings are otherwise
  compared exactly (order ids are case-sensitive) after trimming surrounding spaces.
Generic: similarity = mean embedding cosine between candidate and production answers.
compliance_rate: share of outputs a `compliance_fn` accepts. Without a governance
validator plugged in, the default checks FORMAT only (a parseable tool call / a non-empty
answer) and the scores say so with `compliance_check`.
per_example: each example's headline value in order (1.0 / 0.0 for a name match, the cosine
otherwise), so two evaluations of the same examples can be compared pairwise (`sign_test`).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from evals.prompts import parse_tool_call, parse_tool_calls

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval: sane at 0/n and n/n, unlike the normal approximation."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (min(values, default=0.0), max(values, default=1.0))
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return (mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n))


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Does `a` beat `b` on the same examples? Wins, losses and ties per example, and the exact
    two-sided sign-test p-value on the examples where they differ (McNemar's exact test when the
    values are 0/1): the chance of a split at least this uneven if neither were better."""
    if len(a) != len(b):
        raise ValueError(f"sign_test needs paired values, got {len(a)} and {len(b)}")
    wins = sum(x > y for x, y in zip(a, b, strict=True))
    losses = sum(x < y for x, y in zip(a, b, strict=True))
    n, k = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"wins": wins, "losses": losses, "ties": len(a) - n, "p_value": float(f"{p:.3g}")}


def normalize_value(value: Any) -> Any:
    """Canonical form of an argument value (see the module docstring for the rules)."""
    if isinstance(value, dict):
        return {str(k): normalize_value(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [normalize_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        # Only scalars that round-trip exactly: "5" -> 5 but "05" or "5.0e0" stay strings.
        if isinstance(parsed, bool) or (isinstance(parsed, int | float) and json.dumps(parsed) == text):
            return normalize_value(parsed)
        return text
    return value


def _ratio(name: str, successes: int, n: int) -> dict[str, Any]:
    return {name: successes / n if n else 0.0, f"{name}_ci": list(wilson_interval(successes, n))}


def _call_key(call: dict[str, Any]) -> str:
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return json.dumps([call.get("name"), normalize_value(args)], sort_keys=True, default=str)


def calls_match(output: str, target: dict[str, Any] | Sequence[dict[str, Any]]) -> tuple[bool, bool]:
    """(names match, whole calls match) of one output against the production answer's call(s)."""
    wanted = [target] if isinstance(target, dict) else list(target)
    got = parse_tool_calls(output)
    names = Counter(c.get("name") for c in got) == Counter(c.get("name") for c in wanted)
    return names, names and Counter(map(_call_key, got)) == Counter(map(_call_key, wanted))


def tool_call_scores(outputs: Sequence[str], targets: Sequence[dict[str, Any] | Sequence[dict[str, Any]]],
                     compliance_fn: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """`targets` are the production calls ({"name", "arguments"}, or a list of them for parallel calls);
    `outputs` the raw generated texts."""
    n = len(outputs)
    matched = [calls_match(text, target) for text, target in zip(outputs, targets, strict=True)]
    names, args = sum(m[0] for m in matched), sum(m[1] for m in matched)
    return {"n": n, **_ratio("function_name_accuracy", names, n),
            **_ratio("function_args_accuracy", args, n),
            **compliance_scores(outputs, compliance_fn or (lambda t: parse_tool_call(t) is not None),
                                custom=compliance_fn is not None),
            "per_example": [float(m[0]) for m in matched], "per_example_args": [float(m[1]) for m in matched]}


def generic_scores(outputs: Sequence[str], targets: Sequence[str],
                   compliance_fn: Callable[[str], bool] | None = None,
                   similarity: Callable[[list[str], list[str]], list[float]] | None = None) -> dict[str, Any]:
    if similarity is None:
        from evals.embeddings import cosine_pairs as similarity
    sims = similarity(list(outputs), list(targets)) if outputs else []
    n = len(outputs)
    return {"n": n, "similarity": sum(sims) / n if n else 0.0, "similarity_ci": list(mean_interval(sims)),
            **compliance_scores(outputs, compliance_fn or (lambda t: bool(t.strip())),
                                custom=compliance_fn is not None),
            "per_example": [float(x) for x in sims]}


def compliance_scores(outputs: Sequence[str], check: Callable[[str], bool], *, custom: bool) -> dict[str, Any]:
    passed = sum(bool(check(t)) for t in outputs)
    return {**_ratio("compliance_rate", passed, len(outputs)),
            "compliance_check": "governance" if custom else "format_only"}


def headline(scores: dict[str, Any]) -> float | None:
    """The one number a candidate is judged by: name accuracy for tool calling, similarity otherwise."""
    for key in ("function_name_accuracy", "similarity"):
        if key in scores:
            return scores[key]
    return None
