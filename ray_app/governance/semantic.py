"""The semantic lane of content validation: harm said in words no pattern was written for.

The pattern detectors (detectors.py) are the fast lane: exact, explainable, microseconds, but they catch
only the phrasings they were written for ("how to build a pipe bomb", not "mix household chemicals to
poison my neighbor"). This lane reads meaning instead: each sentence of the content goes through the
packaged MiniLM once (ray_app/embeddings.py; one batch per content), and a linear model over the token
means of its layers scores six categories:

    violence, weapons (incl. chemical, biological, radiological, nuclear), self_harm, illegal,
    hate (against any group: religions and nationalities no list names too), exfiltration
    (company or customer data to personal accounts, credentials leaked)

Each score is in [0, 1], and 0.5 is the operating point tuned on labelled sentences (semantic_fit.py
fits harm_weights.json from harm_exemplars.jsonl). The score of a category is its highest over the
content's sentences, so one harmful sentence inside benign text still counts. This module only scores;
the Rego policy decides, against its own per-category thresholds (policy.DEFAULT_CONFIG).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from ray_app import embeddings
from ray_app.errors import ConfigError

CATEGORIES = ("violence", "weapons", "self_harm", "illegal", "hate", "exfiltration")
WEIGHTS = Path(__file__).with_name("harm_weights.json")

# A sentence longer than this many words is read in overlapping windows of it: the model reads 256
# tokens at most, and a harmful clause diluted in a long run-on sentence scores lower.
WINDOW_WORDS = 60
# Fragments shorter than this ("#17", "Sure:", "1.") carry no meaning of their own; they join a neighbour.
MIN_WORDS = 3
# At most this many windows per content: longer content has its windows merged in pairs (twice at most,
# ~60,000 words), then anything past the cap is left to the patterns, so one request cannot hold a
# replica for minutes.
MAX_WINDOWS = 256

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def windows(text: str) -> list[str]:
    """The pieces of `text` that are scored: its sentences, short fragments joined, long ones windowed."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        if not words:
            continue
        if len(words) < MIN_WORDS and pieces:
            pieces[-1] = f"{pieces[-1]} {' '.join(words)}"
            continue
        step = WINDOW_WORDS // 2
        for start in range(0, max(1, len(words) - step), step):
            pieces.append(" ".join(words[start:start + WINDOW_WORDS]))
    if len(pieces) > 1 and len(pieces[0].split()) < MIN_WORDS:
        pieces[:2] = [f"{pieces[0]} {pieces[1]}"]
    for _ in range(2):
        if len(pieces) > MAX_WINDOWS:
            pieces = [" ".join(pieces[i:i + 2]) for i in range(0, len(pieces), 2)]
    return pieces[:MAX_WINDOWS]


class HarmModel:
    """The fitted linear map from layer means to calibrated category scores (harm_weights.json)."""

    def __init__(self, doc: dict):
        if tuple(doc.get("categories", ())) != CATEGORIES:
            raise ConfigError(f"harm model categories {doc.get('categories')} are not {list(CATEGORIES)}",
                              field="semantic")
        self.layers = list(doc["layers"])
        self.weights = np.asarray(doc["weights"], dtype=np.float32).T  # (features, categories)
        self.bias = np.asarray(doc["bias"], dtype=np.float32)
        self.temperature = float(doc["temperature"])
        self.exemplars_sha256 = doc.get("exemplars_sha256")
        if self.weights.shape != (len(self.layers) * embeddings.DIM, len(CATEGORIES)):
            raise ConfigError(f"harm model weights have shape {self.weights.shape}", field="semantic")

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> HarmModel:
        try:
            return cls(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load the harm model {path}: {exc}", field="semantic") from exc

    def features(self, layer_means: np.ndarray) -> np.ndarray:
        return layer_means[:, self.layers].reshape(len(layer_means), -1)

    def margins(self, features: np.ndarray) -> np.ndarray:
        """Distance past the tuned operating point, per category: > 0 is on the harmful side."""
        return features @ self.weights + self.bias

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(n, 6) in [0, 1]; 0.5 is the tuned operating point."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.margins(features) / self.temperature, -50, 50)))


@lru_cache(maxsize=4)
def _model(path: Path) -> HarmModel:
    return HarmModel.load(path)


class SemanticLane:
    """Scores content per category; the model and MiniLM load on first use (or `warm()`), once per process."""

    def __init__(self, weights: Path = WEIGHTS):
        self.path = Path(weights)

    def warm(self, *, threads: int | None = None) -> None:
        """Load everything now and run one text, so the first request pays nothing extra.

        `threads`: torch's intra-op threads for this whole process. A server validating requests side by
        side in threads wants 1: with more, each forward fights the others (and the proxy) for the same
        cores; on a busy 2-core host one short sentence took ~170 ms with 2 threads, ~20 ms with one.
        """
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.scores("Warming up the semantic lane.")

    def scores(self, text: str) -> dict[str, float]:
        """{category: highest score over the content's windows}; all 0.0 for content without words."""
        pieces = windows(text)
        if not pieces:
            return dict.fromkeys(CATEGORIES, 0.0)
        model = _model(self.path)
        per_window = model.scores(model.features(embeddings.layer_means(pieces, bf16=True)))
        return {c: round(float(s), 4) for c, s in zip(CATEGORIES, per_window.max(axis=0), strict=True)}
