"""What happens at the door, for the Serve app and `flywheel load` alike.

Validate the OpenAI shapes, scrub PII from every string (before anything is written or
logged, and before the id is derived), stamp the constitutional hash, and reject a
record that carries another hash. Counts per PII type come back for the metrics.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from ray_app.config import Settings
from ray_app.governance.pii import scrub_record
from ray_app.schemas import normalize, parse_ingest_body


class Ingest:
    def __init__(self, settings: Settings):
        self.constitutional_hash = settings.governance.constitutional_hash
        self.max_records = settings.serve.max_batch_records
        self.pii_found: Counter[str] = Counter()  # since the last take_pii_counts()

    def _scrub(self, record: dict[str, Any]) -> dict[str, Any]:
        clean, counts = scrub_record(record)
        if counts:
            self.pii_found.update(counts)
        return clean

    def body(self, body: Any) -> list[dict[str, Any]]:
        """An HTTP body (one record or {"records": [...]}) -> the records to store, or InvalidRecord."""
        return parse_ingest_body(body, constitutional_hash=self.constitutional_hash,
                                 max_records=self.max_records, scrub=self._scrub)

    def record(self, raw: dict[str, Any]) -> dict[str, Any]:
        return normalize(raw, constitutional_hash=self.constitutional_hash, scrub=self._scrub)

    def take_pii_counts(self) -> Counter[str]:
        counts, self.pii_found = self.pii_found, Counter()
        return counts
