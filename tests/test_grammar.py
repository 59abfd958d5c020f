"""Schema-constrained tool calls (evals/grammar.py): whatever the model's weights, every token it
writes keeps the answer inside the request's own tools and their JSON schemas, on both decoding
paths (continuous batching over a shared head, and `model.generate`), and both give the same answers."""
from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import pytest
import torch

from evals import generation
from evals.evaluate import prompts_for
from evals.grammar import Constrainer, _ll_tokenizer, grammars_for, tool_call_grammar
from evals.models import load_model
from evals.prompts import parse_tool_calls
from ray_app.pipeline.curation import curate
from tests.workloads import TOOLS, customer_service_records

TYPED = {"type": "function", "function": {"name": "book_table", "description": "Book a table", "parameters": {
    "type": "object", "required": ["people", "time"],
    "properties": {"people": {"type": "integer"}, "time": {"type": "string", "enum": ["18:00", "20:00"]},
                   "vegan": {"type": "boolean"}}}}}


def _examples(n: int) -> list[dict]:
    """Curated tool-calling examples, each request offering its own 1-3 tools (as real services send)."""
    rng = random.Random(7)
    records = customer_service_records(n, seed=4)
    for record in records:
        record["request"]["tools"] = rng.sample([*TOOLS, TYPED], rng.randint(1, 3))
    return curate(records, workload_type="tool_calling")[0]


@pytest.fixture(scope="module")
def model_and_examples(tiny_model):
    """The tiny model with random weights: its free answers are not calls at all. (At this scale most
    constrained answers close their strings within the budget: 9 of 10 on the draw below; larger
    weights write strings that never end, which shows nothing about the calls' schemas.)"""
    model, tokenizer = load_model(tiny_model, "/nonexistent")
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 0.1)
    return model, tokenizer, _examples(10)


def _prefix_valid(tokenizer, grammar: str, text: str) -> bool:
    lt = _ll_tokenizer(tokenizer, len(tokenizer), ())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
    return matcher.validate_tokens(ids) == len(ids)


def _schema_of(tools: list[dict], name: str) -> dict:
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)


def test_every_answer_stays_inside_the_requests_tools_and_schemas(model_and_examples, monkeypatch):
    model, tokenizer, examples = model_and_examples
    prompts, grammars = prompts_for(tokenizer, examples), grammars_for(examples)
    free, _ = generation.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=60)
    assert not any(parse_tool_calls(o) for o in free)  # unconstrained, this model writes no call at all
    shared, stats = generation.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=60, grammars=grammars)
    assert stats["constrained"] == len(prompts)
    monkeypatch.setattr(generation.SharedHead, "build", classmethod(lambda cls, *args, **kwargs: None))
    plain, _ = generation.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=60, grammars=grammars)
    assert shared == plain  # the same masks on both paths

    complete = 0
    for example, grammar, text in zip(examples, grammars, shared, strict=True):
        tools = example["record"]["request"]["tools"]
        assert _prefix_valid(tokenizer, grammar, text), text  # every token was allowed
        for call in parse_tool_calls(text):
            assert call["name"] in {t["function"]["name"] for t in tools}
            jsonschema.validate(call["arguments"], _schema_of(tools, call["name"]))
            complete += 1
    assert complete >= 3  # not vacuous: complete calls were checked (a greedy tie may move a few)


def test_a_schema_the_engine_rejects_keeps_the_names_and_frees_the_arguments(model_and_examples):
    _, tokenizer, _ = model_and_examples
    broken = {"type": "function", "function": {"name": "odd", "parameters": {"type": "object", "properties": {
        "x": {"type": "strin"}}}}}
    grammar = tool_call_grammar([broken, TOOLS[0]])
    constrainer = Constrainer(tokenizer, [grammar, None], vocab_size=len(tokenizer), stop_ids=[])
    assert constrainer.fallbacks == 1 and constrainer.matchers[1] is None
    allowed = constrainer.allowed(0)
    assert allowed is not None and 0 < int(allowed.sum()) < len(tokenizer)  # still constrained: '{' first
    assert constrainer.allowed(1) is None  # no grammar: free
    assert tool_call_grammar([]) is None and tool_call_grammar([{"function": {"description": "no name"}}]) is None


def test_the_grammar_takes_parallel_calls_in_schema_order_and_refuses_what_the_tools_do_not_accept(tiny_model):
    _, tokenizer = load_model(tiny_model, "/nonexistent")
    grammar = tool_call_grammar([TYPED, TOOLS[0]])
    call = {"name": "book_table", "arguments": {"people": 4, "time": "20:00"}}
    other = {"name": "get_order_status", "arguments": {"order_id": "ORD-1"}}
    compact = {"separators": (", ", ": ")}
    good = json.dumps(call, **compact) + "\n" + json.dumps(other, **compact)
    assert _prefix_valid(tokenizer, grammar, good)
    for bad in ({**call, "name": "book_a_table"},  # a name not offered
                {**call, "arguments": {"people": "4", "time": "20:00"}},  # a string where an integer goes
                {**call, "arguments": {"people": 4, "time": "19:00"}},  # not one of the enum's values
                {**call, "arguments": {"people": 4, "time": "20:00", "when": "now"}},  # an invented key
                {**call, "arguments": {"time": "20:00", "people": 4}}):  # out of the schema's order
        assert not _prefix_valid(tokenizer, grammar, json.dumps(bad, **compact)), bad
