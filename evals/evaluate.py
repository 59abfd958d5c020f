"""One evaluation: render prompts, generate in batches, score against the production answers.

The same function serves every eval type: `base` (no examples), `icl` (examples per
query, chosen by the caller) and `customized` (a fine-tuned model, no examples).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from evals.generation import generate
from evals.grammar import grammars_for
from evals.metrics import generic_scores, tool_call_scores
from evals.prompts import build_messages, render_prompt, target_of


def prompts_for(tokenizer: Any, examples: Sequence[dict[str, Any]],
                icl: Sequence[Sequence[dict[str, Any]]] | None = None) -> list[str]:
    icl = icl or [()] * len(examples)
    return [render_prompt(tokenizer, build_messages(e, icl_examples=shots)) for e, shots in zip(examples, icl,
                                                                                               strict=True)]


def answer_budget(tokenizer: Any, examples: Sequence[dict[str, Any]]) -> int:
    """New tokens to allow: the longest production answer plus a little (small models ramble otherwise)."""
    longest = max(len(tokenizer(target_of(e["record"], e["workload_type"]))["input_ids"]) for e in examples)
    return min(160, longest + 8)


def evaluate(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], *,
             icl: Sequence[Sequence[dict[str, Any]]] | None = None, batch_size: int = 8,
             max_new_tokens: int = 48, max_prompt_tokens: int = 512, constrained: bool = True,
             compliance_fn: Callable[[str], bool] | None = None,
             should_stop: Callable[[], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """{"scores": SCORES, "generation": stats, "samples": the first few outputs beside their targets,
    "per_example": {example id: its headline value} (for pairing evaluations, metrics.sign_test),
    "per_example_args": the same for whole tool calls, "constrained": whether tool calls were decoded
    under the request's tools' schemas (evals/grammar.py)}."""
    prompts = prompts_for(tokenizer, examples, icl)
    grammars = grammars_for(examples) if constrained else None
    outputs, stats = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              max_prompt_tokens=max_prompt_tokens, grammars=grammars, should_stop=should_stop,
                              on_batch=on_batch)
    kind = examples[0]["workload_type"] if examples else "tool_calling"
    extra = {}
    if kind == "tool_calling":
        targets = [[c["function"] for c in e["record"]["response"]["choices"][0]["message"]["tool_calls"]]
                   for e in examples]
        scores = tool_call_scores(outputs, targets, compliance_fn)
        extra["per_example_args"] = dict(zip((e["id"] for e in examples), scores.pop("per_example_args"),
                                             strict=True))
    else:
        scores = generic_scores(outputs, [target_of(e["record"], kind) for e in examples], compliance_fn)
    per_example = dict(zip((e["id"] for e in examples), scores.pop("per_example"), strict=True))
    samples = [{"output": o, "target": target_of(e["record"], kind)} for o, e in zip(outputs[:5], examples[:5],
                                                                                    strict=False)]
    stats["prompt_tokens_mean"] = (sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
                                   / max(1, len(prompts)))
    return {"scores": scores, "generation": stats, "samples": samples, "per_example": per_example, **extra,
            "constrained": bool(grammars and any(grammars))}
