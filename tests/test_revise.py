"""The critique-revision cycle: scripted generators check the loop's rules, the tiny model runs it for real."""
from __future__ import annotations

import pytest

from ray_app import governance
from ray_app.config import Settings
from ray_app.pipeline.curation import curate
from tests.conftest import chat_record
from train.revise import critique_revise, model_generator, repair_records

BIASED, LEAKY_BIASED, LEAKY = "Women are bad at math.", "Mail john@example.com. Women are bad at math.", \
    "Mail john@example.com"
FINE = "Happy to help with your order."


class Scripted:
    """Answers critique prompts with a fixed critique and revision prompts from a per-question script."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {q: list(answers) for q, answers in scripts.items()}
        self.calls: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.calls.append(prompts)
        out = []
        for p in prompts:
            question = p.split("\n", 1)[0].removeprefix("Original prompt: ")
            out.append("It states a stereotype." if "Write a short critique" in p else self.scripts[question].pop(0))
        return out


@pytest.fixture(scope="module")
def validator():
    return governance.from_settings(Settings()).validator


def test_cycle_stops_after_max_revisions_and_keeps_the_best_score(validator):
    gen = Scripted({"q1": [LEAKY_BIASED, LEAKY, BIASED], "q2": [FINE]})
    best = critique_revise([("q1", BIASED), ("q2", BIASED)], generate=gen, validate=validator.validate,
                           max_revisions=3)
    assert len(gen.calls) == 6  # critique + revision per round, 3 rounds for q1
    assert [len(c) for c in gen.calls] == [2, 2, 1, 1, 1, 1]  # q2 left the batch once compliant
    assert "Constitutional violations detected: bias:gender" in gen.calls[0][0]
    assert "Critique: It states a stereotype." in gen.calls[1][0]
    q1, q2 = best
    assert (q1.answer, q1.score, q1.allow, q1.rounds) == (LEAKY, 0.8, False, 3)  # 0.8 beat 0.7, 0.5 and 0.7
    assert q1.original_score == 0.7
    assert (q2.answer, q2.allow, q2.rounds) == (FINE, True, 1)


def test_an_empty_revision_is_not_compliant_and_a_worse_one_never_replaces(validator):
    gen = Scripted({"q": ["   ", LEAKY_BIASED]})
    (best,) = critique_revise([("q", BIASED)], generate=gen, validate=validator.validate, max_revisions=2)
    assert (best.answer, best.allow, best.score, best.rounds) == (BIASED, False, 0.7, 2)


def test_curation_keeps_repaired_records_marked_and_drops_the_rest(validator, workload_id):
    good = chat_record(workload_id, 0, id="a")
    biased = chat_record(workload_id, 1, id="b")
    biased["response"]["choices"][0]["message"]["content"] = BIASED
    stubborn = chat_record(workload_id, 2, id="c")
    stubborn["response"]["choices"][0]["message"]["content"] = BIASED
    tool = chat_record(workload_id, 3, id="d")
    tool["response"]["choices"][0]["message"] = {"role": "assistant", "content": "Sending.", "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "mail", "arguments": '{"to": "john@example.com"}'}}]}
    gen = Scripted({"question 1": [FINE], "question 2": [BIASED, LEAKY]})
    seen: list[list[str]] = []

    def repair(records):
        seen.append([r["id"] for r in records])
        return repair_records(records, generate=gen, validator=validator, max_revisions=2)

    examples, stats = curate([good, biased, stubborn, tool], workload_type="generic",
                             compliant=lambda r: validator.validate_record(r)["allow"], repair=repair)
    assert seen == [["b", "c", "d"]]  # one batch; the tool call is handed over but never revised
    assert [e["id"] for e in examples] == ["a", "b"]
    assert stats["repaired"] == 1 and stats["non_compliant"] == 2 and stats["kept"] == 2
    fixed = examples[1]
    assert fixed["revised"] is True and fixed["revision_rounds"] == 1
    assert fixed["record"]["response"]["choices"][0]["message"]["content"] == FINE
    assert "revised" not in examples[0]


def test_the_tiny_model_runs_the_cycle_end_to_end(tiny_model, tmp_path, validator, workload_id):
    from evals.models import load_model

    model, tokenizer = load_model(tiny_model, tmp_path)
    real = model_generator(model, tokenizer, max_new_tokens=6)
    calls: list[int] = []

    def generate(prompts):
        calls.append(len(prompts))
        return real(prompts)

    records = [chat_record(workload_id, i, id=str(i)) for i in range(2)]
    for r in records:
        r["response"]["choices"][0]["message"]["content"] = BIASED
    out = repair_records(records, generate=generate, validator=validator, max_revisions=2)
    assert len(calls) in (2, 4) and sum(calls) <= 8  # 1 or 2 rounds of critique + revision
    for original, result in zip(records, out, strict=True):
        if result is None:
            continue  # never made compliant in 2 rounds: dropped
        content = result["response"]["choices"][0]["message"]["content"]
        assert content != BIASED and validator.validate(content)["allow"]
        assert 1 <= result["revision"]["rounds"] <= 2 and original["response"]["choices"][0]["message"][
            "content"] == BIASED  # the input is not mutated
