"""PII scrubbing by written form (issue 33): recall and precision per kind, look-alikes kept.

Over the hand-written corpus (tests/pii_corpus_written.py and pii_corpus_phones.py: values as people and systems
write them,
in mail, chat, tickets, logs, JSON, CSV) and its look-alikes (tests/pii_corpus_lookalikes.py:
order numbers, versions, dates, amounts, ISBNs, tracking numbers, UUIDs, hashes, invoice ids,
times, ranges, SKUs, zip codes, near misses). A value is found only when one span of its own kind
covers all of it; a look-alike is kept only when its text comes back unchanged.
"""
from __future__ import annotations

import time

from ray_app.governance.pii import scrub_text
from tests.pii_corpus_written import KINDS, entries, scores

RECALL_GOAL, KEPT_GOAL = 0.99, 0.98


def run() -> list[dict]:
    started = time.perf_counter()
    per_kind, kept, lookalikes = scores()
    seconds = time.perf_counter() - started
    rows = []
    for kind in KINDS:
        found, missed, false = per_kind[kind]
        recall, precision = found / (found + missed), found / max(1, found + false)
        rows += [{"benchmark": "pii", "metric": f"recall, {kind}", "value": recall, "unit": "", "goal": ">= 0.99",
                  "note": f"{'PASS' if recall >= RECALL_GOAL else 'MISS'}: {found} of {found + missed} written values"},
                 {"benchmark": "pii", "metric": f"precision, {kind}", "value": precision, "unit": "", "goal": "",
                  "note": f"{false} spans of this kind on text that was not one"}]
    by_category: dict[str, list[int]] = {}
    for entry in entries():
        if not entry.planted:
            tally = by_category.setdefault(entry.group, [0, 0])
            tally[0] += scrub_text(entry.text)[0] == entry.text
            tally[1] += 1
    lost = ", ".join(f"{name} {n - k}" for name, (k, n) in by_category.items() if k < n) or "none lost"
    rows += [{"benchmark": "pii", "metric": "look-alikes kept", "value": kept / lookalikes, "unit": "",
              "goal": ">= 0.98", "note": f"{'PASS' if kept / lookalikes >= KEPT_GOAL else 'MISS'}: {kept} of "
                                         f"{lookalikes} in {len(by_category)} categories ({lost})"},
             {"benchmark": "pii", "metric": "corpus scored in", "value": seconds * 1e3, "unit": "ms", "goal": "",
              "note": f"{len(entries())} texts, find_pii + scrub_text"}]
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row['metric']:28s} {row['value']:8.3f} {row['goal']:10s} {row['note']}")
