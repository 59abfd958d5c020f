"""Governance in process: policy decisions/s, scrub_record us per record, validator us per call.

(The lead's Serve benchmark adds /v1/validate p50/p99 against a no-op endpoint.)
"""
from __future__ import annotations

import copy
import threading
import time

from ray_app.config import CONSTITUTIONAL_HASH
from ray_app.governance.pii import scrub_record, scrub_text
from ray_app.governance.policy import PolicyEngine
from ray_app.governance.validator import Validator

ANSWER = ("I can help with that. Let me look up your order status right away and check whether the delivery "
          "address can still be changed before the parcel leaves the warehouse.")
RECORD = {
    "workload_id": "customer-service", "client_id": "shop",
    "request": {"model": "prod-70b", "messages": [
        {"role": "system", "content": "You are a helpful assistant for an online store. Answer briefly and politely."},
        {"role": "user", "content": "Hi, I ordered a blue jacket last week (order A-7731) and it still has not "
                                    "arrived. Could you check the status and tell me when it will be delivered? Also, "
                                    "can I change the delivery address to my office instead? I need it before Friday."}],
        "tools": [{"type": "function", "function": {"name": "get_order_status", "description": "Look up an order",
                                                    "parameters": {"type": "object",
                                                                   "properties": {"order_id": {"type": "string"}}}}}]},
    "response": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": ANSWER,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_order_status", "arguments": "{\"order_id\": \"A-7731\"}"}}]}}]},
}


def _with_pii() -> dict:
    record = copy.deepcopy(RECORD)
    record["request"]["messages"][1]["content"] += " Reach me at jane.roe@example.org or (415) 555-2671."
    record["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = (
        "{\"order_id\": \"A-7731\", \"notify\": \"jane.roe@example.org\"}")
    return record


def _us_per_call(fn, seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return elapsed / n * 1e6


def run() -> list[dict]:
    engine = PolicyEngine.load()
    validator = Validator(engine, constitutional_hash=CONSTITUTIONAL_HASH)
    decision_input = {"constitutional_hash": CONSTITUTIONAL_HASH, "violations": [], "compliance_score": 1.0}
    clean, pii = RECORD, _with_pii()
    assert scrub_record(pii)[1], "the PII record must contain PII"

    decide_us = _us_per_call(lambda: engine.decide("content_validation", decision_input))
    threaded: list[float] = []
    workers = [threading.Thread(target=lambda: threaded.append(
        _us_per_call(lambda: engine.decide("content_validation", decision_input)))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    big = "lorem ipsum dolor sit amet 42, " * 170_000  # ~5 MB of ordinary text with numbers
    start = time.perf_counter()
    scrub_text(big)
    big_s = time.perf_counter() - start
    size = len(str(clean))
    return [
        {"benchmark": "governance", "metric": "policy decisions/s (1 thread)", "value": 1e6 / decide_us,
         "unit": "1/s", "goal": ">= 10,000", "note": "regorus, content_validation rule"},
        {"benchmark": "governance", "metric": "policy decisions/s (2 threads, total)",
         "value": sum(1e6 / t for t in threaded), "unit": "1/s", "goal": "", "note": "one engine per thread"},
        {"benchmark": "governance", "metric": "scrub_record, no PII", "value": _us_per_call(lambda: scrub_record(clean)),
         "unit": "us/record", "goal": "< 100", "note": f"~{size} B chat record with tools and a tool call"},
        {"benchmark": "governance", "metric": "scrub_record, with PII", "value": _us_per_call(lambda: scrub_record(pii)),
         "unit": "us/record", "goal": "a few hundred", "note": "email x2 (one in JSON-string args), phone"},
        {"benchmark": "governance", "metric": "scrub_text, 5 MB string", "value": big_s * 1e3, "unit": "ms",
         "goal": "< 1000", "note": "prose with digits, no PII"},
        {"benchmark": "governance", "metric": "Validator.validate", "value": _us_per_call(lambda: validator.validate(ANSWER)),
         "unit": "us/call", "goal": "", "note": f"{len(ANSWER)}-char answer: detectors + Rego decision"},
        {"benchmark": "governance", "metric": "Validator.validate_record",
         "value": _us_per_call(lambda: validator.validate_record(clean)), "unit": "us/call", "goal": "",
         "note": "assistant content + tool-call arguments"},
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row['metric']:40s} {row['value']:12,.1f} {row['unit']:10s} goal {row['goal']}")
