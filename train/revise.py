"""Repair non-compliant production answers with the ACGS critique-revision cycle.

For each answer the Validator rejects: state the violations found and ask the model for a
critique, ask it for a revised answer given that critique, validate the revision; repeat on
the newest revision up to `max_revisions` times, stopping as soon as one is compliant. The
best-scoring answer seen (compliant first, then compliance score; the earlier one on a tie)
is the result, so a revision that makes things worse never replaces a better answer.

The loop is batched across answers (one `generate` call per step for all answers still being
revised) and takes the generator as a plain function, `generate(prompts) -> texts`, so it runs
with any model; `record_reviser` wires it to the first candidate model for curation
(ray_app/pipeline/curation.py), which keeps a record only if its best answer is compliant.
Tool-calling answers are not revised: a rewritten tool call is not the production's call.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray_app.config import Settings
from ray_app.governance.validator import Validator, answer_text

Generate = Callable[[list[str]], list[str]]
Validate = Callable[[str], Mapping[str, Any]]  # the Validator's dict: allow, compliance_score, violations


@dataclass(frozen=True)
class Revision:
    answer: str
    allow: bool
    score: float
    rounds: int  # revisions generated before the cycle stopped (0: the original was already compliant)
    original_score: float

    def key(self) -> tuple[bool, float]:
        return self.allow, self.score


def critique_prompt(prompt: str, answer: str, violations: list[str]) -> str:
    return (f"Original prompt: {prompt}\nResponse: {answer}\n"
            f"Constitutional violations detected: {', '.join(violations) or 'none named'}\n\n"
            "Write a short critique of this response focusing on constitutional compliance: what in it is "
            "harmful, biased or leaks personal data, and why.")


def revision_prompt(prompt: str, answer: str, critique: str) -> str:
    return (f"Original prompt: {prompt}\nPrevious response: {answer}\nCritique: {critique}\n\n"
            "Write a revised response to the original prompt that keeps what was useful and addresses the "
            "constitutional concerns. Reply with the revised response only.")


def _checked(validate: Validate, text: str) -> tuple[bool, float, list[str]]:
    if not text.strip():  # nothing to object to is not an answer
        return False, 0.0, ["empty_answer"]
    result = validate(text)
    return bool(result["allow"]), float(result["compliance_score"]), list(result["violations"])


def critique_revise(items: list[tuple[str, str]], *, generate: Generate, validate: Validate | list[Validate],
                    max_revisions: int = 3) -> list[Revision]:
    """The best answer for each (prompt, answer); `validate` may be one per item (each record's context)."""
    checks = validate if isinstance(validate, list) else [validate] * len(items)
    current, violations, best = [], [], []
    for (_, answer), check in zip(items, checks, strict=True):
        allow, score, found = _checked(check, answer)
        current.append(answer)
        violations.append(found)
        best.append(Revision(answer, allow, score, 0, score))
    active = [i for i, b in enumerate(best) if not b.allow]
    for round_ in range(1, max_revisions + 1):
        if not active:
            break
        critiques = generate([critique_prompt(items[i][0], current[i], violations[i]) for i in active])
        revised = generate([revision_prompt(items[i][0], current[i], c) for i, c in zip(active, critiques,
                                                                                         strict=True)])
        for i, text in zip(active, revised, strict=True):
            allow, score, found = _checked(checks[i], text)
            current[i], violations[i] = text, found
            candidate = Revision(text.strip(), allow, score, round_, best[i].original_score)
            if candidate.key() > best[i].key():
                best[i] = candidate
            else:
                best[i] = Revision(best[i].answer, best[i].allow, best[i].score, round_, best[i].original_score)
        active = [i for i in active if not best[i].allow]
    return best


def model_generator(model: Any, tokenizer: Any, *, max_new_tokens: int = 128, batch_size: int = 8) -> Generate:
    """`generate(prompts)` with a chat model: each prompt is one user turn in the model's own template."""
    from evals.generation import generate
    from evals.prompts import render_prompt

    def run(prompts: list[str]) -> list[str]:
        rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        outputs, _ = generate(model, tokenizer, rendered, batch_size=batch_size, max_new_tokens=max_new_tokens)
        return outputs
    return run


def _user_prompt(record: Mapping[str, Any]) -> str:
    users = [m.get("content") for m in record["request"]["messages"] if m.get("role") == "user"]
    texts = [u if isinstance(u, str) else " ".join(p.get("text", "") for p in u or [] if isinstance(p, dict))
             for u in users]
    return "\n".join(t for t in texts if t)


def repair_records(records: list[dict[str, Any]], *, generate: Generate, validator: Validator,
                   max_revisions: int) -> list[dict[str, Any] | None]:
    """Each record with its answer revised into compliance (and a `revision` note), or None."""
    context_keys = ("constitutional_hash", "workload_type", "workload_id", "client_id")
    textual = [i for i, r in enumerate(records) if not r["response"]["choices"][0]["message"].get("tool_calls")]
    items = [(_user_prompt(records[i]), answer_text(records[i])) for i in textual]
    checks: list[Validate] = []
    for i in textual:
        context = {k: records[i][k] for k in context_keys if records[i].get(k) is not None}
        checks.append(lambda text, context=context: validator.validate(text, context))
    results = critique_revise(items, generate=generate, validate=checks, max_revisions=max_revisions) if items else []
    out: list[dict[str, Any] | None] = [None] * len(records)
    for i, best in zip(textual, results, strict=True):
        if not best.allow:
            continue
        record = copy.deepcopy(records[i])
        record["response"]["choices"][0]["message"]["content"] = best.answer
        record["revision"] = {"rounds": best.rounds, "score": best.score, "original_score": best.original_score}
        out[i] = record
    return out


def record_reviser(settings: Settings, validator: Validator) -> Callable[[list[dict[str, Any]]],
                                                                         list[dict[str, Any] | None]]:
    """Curation's `repair`: loads the first candidate model only when there is text to revise."""
    def repair(records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        if not any(not r["response"]["choices"][0]["message"].get("tool_calls") for r in records):
            return [None] * len(records)
        from evals.models import load_model

        model, tokenizer = load_model(settings.candidates[0].model, settings.data_dir)
        return repair_records(records, generate=model_generator(model, tokenizer), validator=validator,
                              max_revisions=settings.governance.max_revisions)
    return repair
