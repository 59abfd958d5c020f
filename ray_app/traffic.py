"""Posting simulated traffic through the HTTP API, as the simulated services would."""
from __future__ import annotations

import httpx
import orjson

from ray_app.simulator import SERVICES, generate


def post_simulated_traffic(url: str, *, api_key: str, per_service: int = 300, seed: int = 0,
                           batch_size: int = 100, client_id: str = "acme") -> dict[str, int]:
    """Post `per_service` records of every simulated service; return how many each posted."""
    counts: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60.0) as http:
        for service in SERVICES:
            records = list(generate(service, per_service, client_id=client_id, seed=seed))
            for i in range(0, len(records), batch_size):
                resp = http.post("/v1/logs", content=orjson.dumps({"records": records[i:i + batch_size]}))
                resp.raise_for_status()
            counts[service] = len(records)
    return counts
