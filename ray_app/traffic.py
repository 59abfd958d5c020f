"""Sending simulated traffic through FlywheelClient, as the simulated services would."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray_app.client import ClientError, FlywheelClient, RouteNotFound, new_record_id
from ray_app.simulator import SERVICES, generate


def post_simulated_traffic(url: str, *, api_key: str, per_service: int | Mapping[str, int] = 300, seed: int = 0,
                           batch_size: int = 100, client_id: str = "acme") -> dict[str, int]:
    """Log `per_service` records of every simulated service (or of the services a mapping names,
    that many each), flush; return how many each sent.

    Raises a FlywheelError (ClientError, AuthError) when the service refused the key, rejected
    a record, or had not acknowledged everything within the flush timeout.
    """
    problems: list[tuple[dict[str, Any] | None, Exception]] = []

    def on_error(record: dict[str, Any] | None, error: Exception) -> None:
        if not isinstance(error, RouteNotFound):  # a 404 while the app (re)deploys is retried, not lost
            problems.append((record, error))

    wanted = per_service if isinstance(per_service, Mapping) else dict.fromkeys(SERVICES, per_service)
    unknown = sorted(set(wanted) - set(SERVICES))
    if unknown:
        raise ValueError(f"no simulated service {unknown[0]!r}; there are {sorted(SERVICES)}")
    total = sum(wanted.values())
    # No spool: a one-off sender has nowhere to replay from later, so the whole run fits the queue.
    client = FlywheelClient(url, api_key=api_key, batch_size=batch_size, max_queue=max(batch_size, total),
                            on_error=on_error)
    counts: dict[str, int] = {}
    try:
        for service, n in wanted.items():
            ids: dict[int, str] = {}
            records = list(generate(service, n, client_id=client_id, seed=seed))
            for record in records:
                # The simulator repeats a record object for a client retry: the same object gets the
                # same id, so the retry is stored once, as it would be from a real service.
                client.log({**record, "id": ids.setdefault(id(record), new_record_id())})
            counts[service] = len(records)
        timeout = 60.0 + total / 1_000
        if not client.flush(timeout=timeout):
            raise ClientError(f"simulated traffic not acknowledged within {timeout:.0f}s by {url}: "
                              f"{client.stats()}")
    finally:
        client.close(timeout=0)
    if problems:
        record, error = problems[0]
        raise ClientError(f"{len(problems)} simulated records refused by {url}; first "
                          f"({(record or {}).get('id')}): {error}")
    return counts
