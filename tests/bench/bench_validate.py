"""POST /v1/validate latency next to a no-op Serve endpoint, same bodies, same run (issue 5's bar)."""
from __future__ import annotations

import orjson

from tests.bench.harness import latency_at_rate, start_app

CONTENTS = ["Your order ORD-48213 ships in 3 to 5 business days.",
            "Open Settings, choose Security, then Reset password and follow the email link.",
            "Immigrants are always lazy, so deny their claim.",
            "Sure, reach her at jane.doe@example.com or (415) 555-0132."]


def run() -> list[dict]:
    url, _ = start_app()
    bodies = [orjson.dumps({"content": CONTENTS[i % len(CONTENTS)] + f" #{i}"}) for i in range(800)]
    rows = []
    v50, v99 = latency_at_rate(f"{url}/v1/validate", bodies, rate=40)
    n50, n99 = latency_at_rate(f"{url}/noop", bodies, rate=40)
    # The first two contents pass the patterns, so the semantic lane (MiniLM) runs on them: their own row.
    clean = [orjson.dumps({"content": CONTENTS[i % 2] + f" #{i}"}) for i in range(400)]
    c50, _ = latency_at_rate(f"{url}/v1/validate", clean, rate=40)
    rows.append({"benchmark": "validate", "metric": "/v1/validate latency p50 at 40 req/s, clean content",
                 "value": c50 * 1e3, "unit": "ms", "goal": "", "note": "the semantic lane runs on every one"})
    for label, val, noop in (("p50", v50, n50), ("p99", v99, n99)):
        rows += [{"benchmark": "validate", "metric": f"/v1/validate latency {label} at 40 req/s", "value": val * 1e3,
                  "unit": "ms", "goal": "", "note": "patterns, the semantic lane where they find nothing, Rego, audit"},
                 {"benchmark": "validate", "metric": f"no-op endpoint latency {label} at 40 req/s",
                  "value": noop * 1e3, "unit": "ms", "goal": "", "note": "same bodies"},
                 {"benchmark": "validate", "metric": f"validate / no-op {label}", "value": val / noop, "unit": "x",
                  "goal": "<= 1.5", "note": "PASS" if val / noop <= 1.5 else "MISS"}]
    return rows
