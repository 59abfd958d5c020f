"""Metrics: argument normalization, Wilson intervals, scores, prompt rendering and parsing."""
from __future__ import annotations

import pytest

from evals.metrics import calls_match, generic_scores, normalize_value, sign_test, tool_call_scores, wilson_interval
from evals.prompts import parse_tool_call, parse_tool_calls, render_tool_call, render_tool_calls, render_tools
from tests.workloads import TOOLS


@pytest.mark.parametrize(("a", "b", "equal"), [
    ({"x": "5"}, {"x": 5}, True),
    ({"x": "05"}, {"x": 5}, False),
    ({"x": 5.0}, {"x": 5}, True),
    ({"x": "true"}, {"x": True}, True),
    ({"a": 1, "b": [1, "2"]}, {"b": [1, 2], "a": 1}, True),
    ({"id": "A12"}, {"id": "a12"}, False),
    ({"id": " A12 "}, {"id": "A12"}, True),
    ({"x": [1, 2]}, {"x": [2, 1]}, False),
])
def test_normalize_value(a, b, equal):
    assert (normalize_value(a) == normalize_value(b)) is equal


def test_wilson_interval_is_sane_at_the_edges():
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.85
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi)


def test_tool_call_scores_name_and_args():
    targets = [{"name": "get_order_status", "arguments": {"order_id": "ORD-1"}}] * 4
    outputs = ['{"name": "get_order_status", "arguments": {"order_id": "ORD-1"}}',
               'Sure! {"name": "get_order_status", "arguments": "{\\"order_id\\": \\"ORD-2\\"}"}',
               '{"name": "track_shipment", "arguments": {}}',
               "I cannot help with that"]
    scores = tool_call_scores(outputs, targets)
    assert scores["n"] == 4
    assert scores["function_name_accuracy"] == 0.5
    assert scores["function_args_accuracy"] == 0.25
    assert scores["compliance_rate"] == 0.75 and scores["compliance_check"] == "format_only"
    lo, hi = scores["function_name_accuracy_ci"]
    assert lo < 0.5 < hi
    assert scores["per_example"] == [1.0, 1.0, 0.0, 0.0]


def test_a_governance_compliance_fn_replaces_the_format_check():
    scores = tool_call_scores(["{}", "x"], [{"name": "a", "arguments": {}}] * 2, compliance_fn=lambda t: t == "x")
    assert scores["compliance_rate"] == 0.5 and scores["compliance_check"] == "governance"


def test_generic_scores_use_the_similarity_function():
    def similarity(a, b):
        return [1.0 if x == y else 0.0 for x, y in zip(a, b, strict=True)]

    scores = generic_scores(["same", "other", ""], ["same", "thing", "x"], similarity=similarity)
    assert scores["similarity"] == pytest.approx(1 / 3) and scores["n"] == 3
    assert scores["per_example"] == [1.0, 0.0, 0.0]
    assert scores["compliance_rate"] == pytest.approx(2 / 3)


def test_sign_test_counts_pairs_and_gives_the_exact_two_sided_p():
    # 6 wins, 0 losses: 2 * 0.5**6 (3 significant digits). McNemar's exact test on 0/1 scores.
    assert sign_test([1.0] * 6 + [1.0, 0.0], [0.0] * 6 + [1.0, 0.0]) == \
        {"wins": 6, "losses": 0, "ties": 2, "p_value": 0.0312}
    # 7 vs 2 of 9 discordant: 2 * (1 + 9 + 36) / 512
    assert sign_test([1.0] * 7 + [0.0] * 2, [0.0] * 7 + [1.0] * 2)["p_value"] == pytest.approx(92 / 512, rel=1e-2)
    assert 0.0 < sign_test([1.0] * 34, [0.0] * 34)["p_value"] == pytest.approx(2 * 0.5 ** 34, rel=1e-2)
    assert sign_test([0.5, 0.2], [0.5, 0.2]) == {"wins": 0, "losses": 0, "ties": 2, "p_value": 1.0}
    assert sign_test([0.9, 0.1, 0.7], [0.1, 0.9, 0.2])["p_value"] == 1.0  # 2 vs 1: no evidence either way
    with pytest.raises(ValueError, match="paired values, got 2 and 1"):
        sign_test([1.0, 0.0], [1.0])


def test_minilm_similarity_ranks_paraphrases_above_unrelated_text():
    from evals.embeddings import cosine_pairs

    near, far = cosine_pairs(["Your order has shipped.", "Your order has shipped."],
                             ["The order was sent out.", "Bananas are yellow."])
    assert near > far + 0.3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city. " + "Very long words. " * 20,
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer"}}}}}}


def test_tools_render_with_types_required_marks_enums_and_short_descriptions():
    assert render_tools(TOOLS).splitlines()[2] == "initiate_return(order_id: string, reason: string) - Start a return"
    line = render_tools([WEATHER])
    assert line.startswith('get_weather(city: string, unit?: "c"|"f", days?: integer[]) - The weather now')
    assert line.endswith(" ...") and len(line.split(" - ")[1].split()) == 16 + 1  # cut at 16 words
    many = render_tools([WEATHER] * 40, budget=3000)  # over budget: descriptions shrink, then go
    assert len(many) <= 3000 and " - " not in many


def test_parallel_calls_render_in_schema_order_and_match_as_a_set():
    calls = [{"function": {"name": "get_weather", "arguments": '{"unit": "c", "city": "Paris"}'}},
             {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    text = render_tool_calls(calls, [WEATHER])
    assert text.splitlines()[0] == '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    targets = [c["function"] for c in calls]
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
                                      {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    swapped = "\n".join(reversed(text.splitlines()))
    assert calls_match(swapped, targets) == (True, True)  # order ignored
    assert calls_match(text.splitlines()[0], targets) == (False, False)  # one call missing
    assert calls_match(text + "\n" + text.splitlines()[1], targets) == (False, False)  # one too many
    wrong_value = text.replace("Oslo", "Bergen")
    assert calls_match(wrong_value, targets) == (True, False)


def test_render_tools_is_compact_and_parse_round_trips():
    text = render_tool_call({"name": "initiate_return", "arguments": '{"order_id": "ORD-1", "reason": "late"}'})
    assert parse_tool_call(text) == {"name": "initiate_return", "arguments": {"order_id": "ORD-1", "reason": "late"}}
    nested = '{"function": {"name": "f", "parameters": {"a": 1}}}'
    assert parse_tool_call(nested) == {"name": "f", "arguments": {"a": 1}}
    assert parse_tool_call("no json here {oops") is None
