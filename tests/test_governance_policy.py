"""Rego policies through PolicyEngine: each rule's allow/deny, fail-closed behaviour, load errors, threads."""
from __future__ import annotations

import threading

import pytest

from ray_app.errors import ConfigError
from ray_app.governance.policy import PolicyEngine

HASH = "cdd01ef066bc6cf2"


@pytest.fixture(scope="module")
def engine():
    return PolicyEngine.load()


def _content(**kw):
    return {"constitutional_hash": HASH, "violations": [], "compliance_score": 1.0, **kw}


def test_content_validation_allows_clean_content(engine):
    d = engine.decide("content_validation", _content())
    assert (d.allow, d.reasons, d.lane, d.rule, d.constitutional_hash) == (True, [], "fast", "content_validation", HASH)


@pytest.mark.parametrize("change,reason", [
    ({"constitutional_hash": "0000000000000000"}, "constitutional_hash_mismatch"),
    ({"violations": ["bias:gender"]}, "violation:bias:gender"),
    ({"compliance_score": 0.94}, "compliance_below_threshold:0.94<0.95"),
    ({"compliance_score": 0.96, "min_compliance": 0.99}, "compliance_below_threshold:0.96<0.99"),
    ({"compliance_score": "high"}, "compliance_score_missing"),
])
def test_content_validation_denies_with_reason(engine, change, reason):
    d = engine.decide("content_validation", _content(**change))
    assert not d.allow and reason in d.reasons


def test_harmful_content_goes_to_the_slow_lane(engine):
    d = engine.decide("content_validation", _content(violations=["harmful:violence"], compliance_score=0.5))
    assert not d.allow and d.lane == "slow"


@pytest.mark.parametrize("rule", ["content_validation", "model_inference", "model_fine_tuning", "promotion"])
def test_empty_input_is_denied_for_every_rule(engine, rule):
    d = engine.decide(rule, {})
    assert not d.allow and d.reasons


def _inference(**kw):
    base = {"model": {"constitutional_hash": HASH, "compliance_score": 0.97}, "request": {"safety_validated": True},
            "content": {"violations": []},
            "audit": {"trail_enabled": True, "constitutional_hash": HASH, "retention_days": 2555},
            "resources": {"gpu_hours": 10, "requested_gpus": 1, "memory_gb": 16}, "user": {"id": "svc"}}
    base.update(kw)
    return base


def test_model_inference_rule(engine):
    assert engine.decide("model_inference", _inference()).allow
    short = engine.decide("model_inference", _inference(audit={"trail_enabled": True, "constitutional_hash": HASH,
                                                                "retention_days": 365}))
    assert not short.allow and "audit_retention_too_short:365<2555" in short.reasons
    greedy = engine.decide("model_inference", _inference(resources={"gpu_hours": 500, "requested_gpus": 64}))
    assert {"gpu_hours_over_quota:500>100", "gpus_over_quota:64>8"} <= set(greedy.reasons)


def test_unknown_rule_and_runtime_errors_fail_closed(engine, tmp_path):
    d = engine.decide("no_such_rule", {})
    assert not d.allow and d.reasons[0].startswith("policy_error:")
    policy = tmp_path / "boom.rego"
    policy.write_text('package acgs.nemo.constitutional\nimport rego.v1\nboom := {"allow": true, "x": 1 / 0}\n'
                      'half := {"allow": "yes"}\n')
    broken = PolicyEngine.load([policy])
    for rule in ("boom", "half"):
        d = broken.decide(rule, {})
        assert not d.allow and d.reasons[0].startswith("policy_error:"), d


def test_a_policy_that_does_not_parse_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.rego"
    bad.write_text("package acgs.nemo.constitutional\nimport rego.v1\n\nallow if {\n  input.a ==\n}\n")
    with pytest.raises(ConfigError, match=r"bad\.rego line \d+"):
        PolicyEngine.load([bad])


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match="max_epsilom"):
        PolicyEngine.load(config={"max_epsilom": 3})


def test_decisions_from_many_threads(engine):
    results: list[bool] = []
    lock = threading.Lock()

    def work(i):
        d = engine.decide("content_validation", _content(compliance_score=1.0 if i % 2 else 0.1))
        with lock:
            results.append(d.allow == bool(i % 2))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 16
