"""Batched generation: the shared prompt head runs once and changes nothing in the outputs."""
from __future__ import annotations

import pytest

import evals.generation as generation
from evals.evaluate import prompts_for
from evals.models import load_model
from ray_app.pipeline.curation import curate
from tests.workloads import customer_service_records, generic_records


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model):
    model, tokenizer = load_model(tiny_model, "/nonexistent")
    examples, _ = curate(customer_service_records(12, seed=4), workload_type="tool_calling")
    return model, tokenizer, prompts_for(tokenizer, examples)


def test_the_shared_head_runs_once_and_the_outputs_are_the_plain_paths(model_and_prompts, monkeypatch):
    model, tokenizer, prompts = model_and_prompts
    head = generation._SharedHead.build(model, tokenizer, prompts, 512)
    assert head is not None and len(head.head) >= 40  # the system prompt and the tool list
    assert all(len(tail) >= 1 for tail in head.tails)

    shared, shared_stats = generation.generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=12)
    monkeypatch.setattr(generation._SharedHead, "build", classmethod(lambda cls, *args: None))
    plain, plain_stats = generation.generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=12)
    one_by_one, _ = generation.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=12)
    assert shared == plain == one_by_one
    assert shared_stats["generated_tokens"] == plain_stats["generated_tokens"] > 0


def test_prompts_without_a_long_common_head_take_the_plain_path(model_and_prompts):
    model, tokenizer, _ = model_and_prompts
    examples, _ = curate(generic_records(4, seed=2), workload_type="generic")
    prompts = ["Hello there, how are you?", "Why is the sky blue?"]
    assert generation._SharedHead.build(model, tokenizer, prompts, 512) is None
    assert generation._SharedHead.build(model, tokenizer, prompts_for(tokenizer, examples)[:1], 512) is None
    long_prompts = prompts_for(tokenizer, curate(customer_service_records(3, seed=4), workload_type="tool_calling")[0])
    assert generation._SharedHead.build(model, tokenizer, long_prompts, 8) is None  # truncation would cut the head
    outputs, stats = generation.generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=6)
    assert len(outputs) == 2 and stats["prompts"] == 2
