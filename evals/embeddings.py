"""Sentence embeddings for evaluation: text similarity of generic answers, semantic selection of in-context examples.

The model and its loading live in ray_app/embeddings.py (content validation uses the same forward pass);
`embed` is re-exported here so evals and train keep importing it from evals.
"""
from __future__ import annotations

from ray_app.embeddings import embed

__all__ = ["cosine_pairs", "embed"]


def cosine_pairs(a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of a[i] with b[i]; an empty text scores 0 against anything non-empty."""
    ea, eb = embed(a), embed(b)
    sims = (ea * eb).sum(axis=1).tolist()
    return [0.0 if (not x.strip()) != (not y.strip()) else float(s) for x, y, s in zip(a, b, sims, strict=True)]
