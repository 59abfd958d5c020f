"""Curation, splits and in-context example selection (pure data, no models)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ray_app.config import DataSplitConfig
from ray_app.errors import JobFailed, NotFound
from ray_app.pipeline.curation import curate, export_records, require_enough, workload_type_of
from ray_app.pipeline.icl import SemanticSelector, fit_budget, select_uniform
from ray_app.pipeline.split import split_examples, stratified_take
from ray_app.storage.sqlite import SQLiteLogStore
from tests.workloads import customer_service_records, generic_records


def test_curate_parses_string_arguments_and_keeps_tool_names():
    examples, stats = curate(customer_service_records(30, seed=3), workload_type="tool_calling")
    assert stats["exported"] == 30 and stats["kept"] == len(examples) > 0
    call = examples[0]["record"]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]
    assert isinstance(call["arguments"], dict)
    assert examples[0]["tool"] == call["name"]
    assert examples[0]["user_text"] == examples[0]["record"]["request"]["messages"][-1]["content"]


def test_curate_drops_invalid_missing_tool_calls_bad_arguments_and_duplicates():
    good = customer_service_records(5, seed=4)
    dup = json.loads(json.dumps(good[0]))
    dup["id"] = "another-id"  # same user turn, different id: a duplicate by content
    no_call = json.loads(json.dumps(good[1]))
    no_call["id"] = "no-call"
    no_call["request"]["messages"][-1]["content"] = "hello there"
    no_call["response"]["choices"][0]["message"] = {"role": "assistant", "content": "Hi!"}
    bad_args = json.loads(json.dumps(good[2]))
    bad_args["id"] = "bad-args"
    bad_args["request"]["messages"][-1]["content"] = "something unique"
    bad_args["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "{not json"
    invalid = {"id": "invalid", "workload_id": "w", "client_id": "c", "request": {"messages": []},
               "response": {"choices": []}}
    examples, stats = curate(good + [dup, no_call, bad_args, invalid], workload_type="tool_calling")
    assert len(examples) == 5
    assert stats == {"exported": 9, "duplicates": 1, "no_tool_call": 1, "unparseable_arguments": 1,
                     "invalid": 1, "kept": 5}


def test_a_served_model_never_becomes_its_own_training_target():
    """Gateway calls (serve/gateway.py): the upstream's answer is the target; a candidate's only when mirrored."""
    upstream, model_only, mirrored, shadowed = (json.loads(json.dumps(r)) for r in customer_service_records(4, seed=9))
    upstream |= {"served_by": "upstream", "route": {"mode": "off", "model": None}}
    production = mirrored["response"]
    wrong = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "not_a_tool_the_upstream_called", "arguments": "{}"}}]}}]}
    model_only |= {"served_by": "ft:m:1", "response": wrong, "route": {"mode": "live", "model": "ft:m:1"}}
    mirrored |= {"served_by": "ft:m:1", "response": wrong, "route": {"mode": "live", "model": "ft:m:1"},
                 "shadow": {"served_by": "upstream", "role": "mirror", "response": production}}
    shadowed |= {"served_by": "upstream", "shadow": {"served_by": "ft:m:1", "response": wrong}}
    examples, stats = curate([upstream, model_only, mirrored, shadowed], workload_type="tool_calling")
    assert stats["model_answered"] == 1 and stats["kept"] == 3
    assert {e["id"] for e in examples} == {upstream["id"], mirrored["id"], shadowed["id"]}
    assert all(e["tool"] != "not_a_tool_the_upstream_called" for e in examples)
    kept = next(e for e in examples if e["id"] == mirrored["id"])["record"]
    assert kept["served_by"] == "upstream" and kept["response"]["choices"][0]["message"]["tool_calls"][0][
        "function"]["name"] == production["choices"][0]["message"]["tool_calls"][0]["function"]["name"]


def test_generic_workload_keeps_text_answers():
    examples, _ = curate(generic_records(10), workload_type="generic")
    assert len(examples) == 10 and all(e["tool"] is None for e in examples)
    assert workload_type_of(generic_records(3)) == "generic"
    assert workload_type_of(customer_service_records(3)) == "tool_calling"


def test_require_enough_names_the_setting_and_the_drops():
    examples, stats = curate(customer_service_records(10), workload_type="tool_calling")
    with pytest.raises(JobFailed, match=r"only \d+ usable records.*min_total_records"):
        require_enough(examples, stats, min_total=50)
    require_enough(examples, stats, min_total=len(examples))


def test_export_unknown_workload_is_not_found(tmp_path):
    store = SQLiteLogStore(tmp_path / "logs.db")
    store.put_many(customer_service_records(3))
    with pytest.raises(NotFound, match="no records for workload 'nope'"):
        export_records(store, "nope", "acme", limit=10)
    assert len(export_records(store, "customer-service", "acme", limit=2)) == 2


def test_split_sizes_are_disjoint_and_stratified():
    examples, _ = curate(customer_service_records(300, seed=5), workload_type="tool_calling")
    splits = split_examples(examples, DataSplitConfig(eval_size=60, val_ratio=0.1, random_seed=7))
    ids = [e["id"] for part in splits.values() for e in part]
    assert len(ids) == len(set(ids)) == len(examples)
    assert len(splits["eval"]) == 60 and len(splits["val"]) == round((len(examples) - 60) * 0.1)
    overall = Counter(e["tool"] for e in examples)
    in_eval = Counter(e["tool"] for e in splits["eval"])
    for tool, count in overall.items():  # each tool's share within one example of proportional
        assert abs(in_eval[tool] - 60 * count / len(examples)) <= 1
    again = split_examples(examples, DataSplitConfig(eval_size=60, val_ratio=0.1, random_seed=7))
    assert [e["id"] for e in again["eval"]] == [e["id"] for e in splits["eval"]]


def test_stratified_take_keeps_a_rare_class():
    items = [{"id": i, "tool": "common"} for i in range(95)] + [{"id": 100 + i, "tool": "rare"} for i in range(5)]
    import random

    taken, rest = stratified_take(items, 20, random.Random(0))
    assert Counter(e["tool"] for e in taken) == {"common": 19, "rare": 1}
    assert len(rest) == 80


def test_split_refuses_when_nothing_is_left_to_train():
    examples, _ = curate(customer_service_records(3), workload_type="tool_calling")
    with pytest.raises(JobFailed, match="too few"):
        split_examples(examples[:2], DataSplitConfig(eval_size=5))


def test_uniform_selection_covers_tools_before_repeating_and_fits_budget():
    examples, _ = curate(customer_service_records(120, seed=6), workload_type="tool_calling")
    chosen = select_uniform(examples, max_examples=6, budget_tokens=10_000, cost=lambda e: 10, seed=1)
    assert len({e["tool"] for e in chosen}) == 6
    assert len(select_uniform(examples, max_examples=6, budget_tokens=25, cost=lambda e: 10)) == 2


def test_fit_budget_skips_an_example_that_does_not_fit():
    items = [{"id": 1, "n": 5}, {"id": 2, "n": 50}, {"id": 3, "n": 5}]
    chosen = fit_budget(items, max_examples=3, budget_tokens=20, cost=lambda e: e["n"])
    assert [e["id"] for e in chosen] == [1, 3]


def test_semantic_selection_finds_nearest_and_never_the_query_itself():
    def embed(texts):  # a bag-of-words embedding: enough to test the ranking logic
        vocab = ["order", "track", "return", "human"]
        return np.array([[t.lower().count(w) + 0.01 for w in vocab] for t in texts], dtype=np.float32)

    pool = [{"id": str(i), "user_text": t, "tool": t.split()[0]} for i, t in
            enumerate(["order status please", "track my parcel", "return this", "human please", "order again"])]
    query = {"id": "q", "user_text": "where is my order"}
    (shots,) = SemanticSelector(pool, embed).select([query], max_examples=2, budget_tokens=100, cost=lambda e: 1)
    assert {e["id"] for e in shots} == {"0", "4"}
    (own,) = SemanticSelector(pool, embed).select([pool[1]], max_examples=1, budget_tokens=100, cost=lambda e: 1)
    assert own[0]["id"] != "1"


@pytest.mark.parametrize("service", ["generic-assistant", "policy-governance"])
def test_curate_drops_the_non_compliant_answers_the_simulator_plants(service):
    from ray_app.config import CONSTITUTIONAL_HASH
    from ray_app.governance.policy import PolicyEngine
    from ray_app.governance.validator import Validator
    from ray_app.simulator import NON_COMPLIANT, generate

    records = [{**r, "id": r.get("id") or f"{service}-{i}"} for i, r in enumerate(generate(service, 400, seed=3))]
    planted = sum(r["response"]["choices"][0]["message"]["content"] in NON_COMPLIANT for r in records)
    assert planted >= 5  # the simulator plants ~4%
    validator = Validator(PolicyEngine.load(), constitutional_hash=CONSTITUTIONAL_HASH)
    workload_type = workload_type_of(records)
    examples, stats = curate(records, workload_type=workload_type,
                             compliant=lambda r: validator.validate_record(r)["allow"])
    assert stats["non_compliant"] == planted  # every planted answer, and no compliant one
    answers = {e["record"]["response"]["choices"][0]["message"]["content"] for e in examples}
    assert not answers & set(NON_COMPLIANT) and len(examples) == stats["kept"] > 0
    # without the check they are kept when they are the first answer to their question
    planted_first = sorted(records,
                           key=lambda r: r["response"]["choices"][0]["message"]["content"] not in NON_COMPLIANT)
    unchecked, unchecked_stats = curate(planted_first, workload_type=workload_type)
    assert "non_compliant" not in unchecked_stats
    assert {e["record"]["response"]["choices"][0]["message"]["content"] for e in unchecked} & set(NON_COMPLIANT)
