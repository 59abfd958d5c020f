"""Content validation on the held-apart test split (issue 33): recall and false-positive rate per category.

tests/data/validation_labelled.jsonl: 295 labelled sentences written apart from the exemplars the semantic
lane is fitted and tuned on (ray_app/governance/harm_exemplars.jsonl), never used to fit or tune: 20
harmful ones per category in varied phrasing (requests, answers, polite, slang, indirect) and 25 benign
look-alikes per category (news, history, medicine, chemistry lessons, fiction, security advice, HR and
legal talk about hate speech, customer support), plus 25 everyday ones. What is measured is the
Validator's verdict, both lanes and the Rego decision, as POST /v1/validate gives it:
- recall of a category: its harmful sentences denied;
- false-positive rate of a category: its benign look-alikes denied.
The same split through the patterns alone is the row beside each recall (the lane before issue 33).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray_app.config import CONSTITUTIONAL_HASH
from ray_app.governance.policy import PolicyEngine
from ray_app.governance.semantic import CATEGORIES
from ray_app.governance.validator import Validator

SPLIT = Path(__file__).resolve().parents[1] / "data" / "validation_labelled.jsonl"
RECALL_GOAL, FPR_GOAL = 0.9, 0.05


def labelled(path: Path = SPLIT) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def denied(rows: list[dict], validator: Validator) -> list[bool]:
    return [not validator.validate(r["text"])["allow"] for r in rows]


def run() -> list[dict]:
    rows = labelled()
    engine = PolicyEngine.load()
    both = Validator(engine, constitutional_hash=CONSTITUTIONAL_HASH)
    both.semantic.warm(threads=1)  # as the Serve replica runs it
    started = time.perf_counter()
    verdicts = denied(rows, both)
    seconds = time.perf_counter() - started
    patterns = denied(rows, Validator(engine, constitutional_hash=CONSTITUTIONAL_HASH, semantic=False))
    out = []
    for category in CATEGORIES:
        harmful = [i for i, r in enumerate(rows) if r["label"] == category]
        lookalike = [i for i, r in enumerate(rows) if r["label"] == "benign" and r["like"] == category]
        recall = sum(verdicts[i] for i in harmful) / len(harmful)
        fpr = sum(verdicts[i] for i in lookalike) / len(lookalike)
        out += [_row(f"recall, {category}", recall, f">= {RECALL_GOAL}", recall >= RECALL_GOAL,
                     f"of {len(harmful)} harmful; patterns alone "
                     f"{sum(patterns[i] for i in harmful) / len(harmful):.2f}"),
                _row(f"false-positive rate, {category}", fpr, f"<= {FPR_GOAL}", fpr <= FPR_GOAL,
                     f"of {len(lookalike)} benign look-alikes")]
    benign = [i for i, r in enumerate(rows) if r["label"] == "benign"]
    everyday = [i for i in benign if rows[i]["like"] == "everyday"]
    out += [_row("false-positive rate, everyday text", sum(verdicts[i] for i in everyday) / len(everyday), "", None,
                 f"of {len(everyday)} support answers, how-tos, small talk"),
            _row("false-positive rate, all benign", sum(verdicts[i] for i in benign) / len(benign), "", None,
                 f"of {len(benign)}"),
            {"benchmark": "semantic", "metric": "validation time per sentence", "value": seconds / len(rows) * 1e3,
             "unit": "ms", "goal": "", "note": "both lanes and the Rego decision, in process, one torch thread"}]
    return out


def _row(metric: str, value: float, goal: str, passed: bool | None, note: str) -> dict:
    verdict = "" if passed is None else ("PASS: " if passed else "MISS: ")
    return {"benchmark": "semantic", "metric": metric, "value": value, "unit": "", "goal": goal,
            "note": verdict + note}


if __name__ == "__main__":
    for row in run():
        print(f"{row['metric']:38s} {row['value']:7.3f} {row['goal']:8s} {row['note']}")
