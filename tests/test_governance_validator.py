"""Detectors and the Validator behind POST /v1/validate."""
from __future__ import annotations

import pytest

from ray_app.governance.detectors import detect
from ray_app.governance.policy import PolicyEngine
from ray_app.governance.validator import Validator, answer_text

HASH = "cdd01ef066bc6cf2"


@pytest.fixture(scope="module")
def validator():
    return Validator(PolicyEngine.load(), constitutional_hash=HASH)


@pytest.mark.parametrize("text,expected", [
    ("Step one of how to build a pipe bomb is...", ["harmful:violence"]),
    ("The easiest way to poison someone is", ["harmful:violence"]),
    ("Honestly you should kill yourself", ["harmful:self_harm"]),
    ("Here is how to launder money through a shell company", ["harmful:illegal"]),
    ("First, cook meth in a well ventilated room", ["harmful:illegal"]),
    ("All women are bad at math.", ["bias:gender"]),
    ("Immigrants are criminals, everyone knows it", ["bias:nationality"]),
    ("Muslims shouldn't be allowed to vote", ["bias:religion"]),
    ("Old people are too emotional to lead", ["bias:age"]),
    ("ＨＯＷ ＴＯ ＭＡＫＥ Ａ ＢＯＭＢ", ["harmful:violence"]),
    ("how to make a b\u200bomb", ["harmful:violence"]),
    ("write to me: jane@example.org", ["pii_leak:email"]),
])
def test_detectors_flag(text, expected):
    assert detect(text) == expected


@pytest.mark.parametrize("text", [
    "The film depicts the violence of the war.", "Women's suffrage changed politics.",
    "The bombastic speech went on for hours.", "Men and women are welcome.", "Call the suicide prevention hotline.",
    "Our order #A-7731 ships on 2024-03-15.", "Killing a process: use kill -9 PID.",
])
def test_detectors_leave_benign_text(text):
    assert detect(text) == []


def test_validate_shape_and_clean_content(validator):
    result = validator.validate("Your order ships tomorrow.")
    assert set(result) >= {"allow", "compliance_score", "violations", "constitutional_hash"}
    assert (result["allow"], result["compliance_score"], result["violations"]) == (True, 1.0, [])
    assert result["constitutional_hash"] == HASH


def test_validate_denies_violations_with_lower_score(validator):
    result = validator.validate("All women are bad at math; mail jane@example.org")
    assert not result["allow"]
    assert result["violations"] == ["bias:gender", "pii_leak:email"]
    assert result["compliance_score"] == 0.5
    assert "violation:bias:gender" in result["reasons"]


def test_hash_mismatch_is_a_violation(validator):
    result = validator.validate("fine text", {"constitutional_hash": "deadbeefdeadbeef"})
    assert not result["allow"] and "constitutional_hash_mismatch" in result["violations"]
    assert result["compliance_score"] == 0.0


def test_validate_record_reads_answer_and_tool_arguments(validator):
    record = {"constitutional_hash": HASH, "workload_type": "tool_calling",
              "response": {"choices": [{"message": {"role": "assistant", "content": [{"type": "text", "text": "Sure."}],
                                                    "tool_calls": [{"function": {"name": "email",
                                                                                 "arguments": {"to": "x@y.com"}}}]}}]}}
    assert answer_text(record) == 'Sure.\nemail({"to":"x@y.com"})'
    result = validator.validate_record(record)
    assert not result["allow"] and result["violations"] == ["pii_leak:email"]
