"""Train only the top of the network, on cached activations of the frozen bottom.

LoRA sits on the last `top_layers` decoder layers (lora.top_layers), so everything below
them is frozen and gives the same output every epoch. We run that bottom once over the
data, keep its output (the hidden states entering the first adapted layer), and from then
on every step runs only the top layers: on SmolLM2-135M with 4 of 30 layers adapted an
epoch costs a small fraction of a full forward and backward pass. That is what makes
DP-SGD practical on CPU: differential privacy wants large batches and many epochs.

Two more savings, both exact: the vocabulary projection (the largest matmul in a small
model) runs only at answer positions, and padding every row shares is trimmed. The cached
path and the full path compute the same loss (tests/test_dp_training.py checks it), and the
adapter saved afterwards is an ordinary PEFT adapter for the whole model.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from evals.decode import expanded_cache, full_attention_only
from train.data import IGNORE


def causal_lm(peft_model: Any) -> Any:
    """The Hugging Face CausalLM inside a PEFT model."""
    return peft_model.get_base_model()


class AnswerLoss(torch.nn.Module):
    """The module that is trained: (inputs, labels, mask) -> mean over the batch of each record's
    answer loss, the summed cross entropy of its answer tokens (nats per record). `inputs` are
    token ids (full model) or float hidden states at the first adapted layer (see `LayerWindow`).

    Summed, not averaged over tokens, because DP-SGD's unit is the record: its gradient is what
    one record can move the adapter, and privacy.max_grad_norm (1.0) bounds exactly that. Under
    a per-token mean a LoRA record's gradient norm is ~0.05-0.1 (measured on SmolLM2), so a clip
    norm of 1 would clip nothing and the noise, scaled to the clip norm, would be ~20x the signal.

    Opacus, DDP and DPDDP wrap this module, so a batch goes through their `forward` as usual.
    """

    def __init__(self, peft_model: Any):
        super().__init__()
        self.peft_model = peft_model
        self.per_record = False  # True: forward returns each record's loss (ghost clipping's criterion reduces)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        width = int(mask.sum(dim=1).max().item())  # trim the padding every row shares: no FLOPs on it
        inputs, labels, mask = inputs[:, :width], labels[:, :width], mask[:, :width]
        lm = causal_lm(self.peft_model)
        given = {"inputs_embeds": inputs} if inputs.is_floating_point() else {"input_ids": inputs}
        states = lm.get_decoder()(attention_mask=mask, use_cache=False, **given).last_hidden_state
        targets = labels[:, 1:]
        answer = targets != IGNORE
        logits = lm.lm_head(states[:, :-1][answer]).float()  # vocabulary projection at answer tokens only
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        per_token = torch.nn.functional.cross_entropy(logits, targets[answer], reduction="none")
        rows = answer.nonzero(as_tuple=True)[0]
        per_example = torch.zeros(len(labels), device=per_token.device).index_add(0, rows, per_token)
        return per_example if self.per_record else per_example.mean()


class LayerWindow:
    """Switches a decoder between its full stack and only its top `k` layers.

    In `top` mode the model takes the hidden states entering layer L-k as `inputs_embeds`
    (rotary positions and masks are recomputed from the same positions, so the result is
    exact). `full()` restores the stack, e.g. to save the adapter under its real layer
    indices or to compute the cache.
    """

    def __init__(self, lm: Any, k: int):
        self.lm, self.decoder = lm, lm.get_decoder()
        self.layers = self.decoder.layers
        self.depth = len(self.layers)
        self.k = min(k, self.depth)
        self.layer_types = getattr(lm.config, "layer_types", None)

    @property
    def start(self) -> int:
        return self.depth - self.k

    def top(self) -> None:
        self._set(torch.nn.ModuleList(list(self.layers)[self.start:]), self.k,
                  self.layer_types[self.start:] if self.layer_types else None)

    def full(self) -> None:
        self._set(self.layers, self.depth, self.layer_types)

    @contextmanager
    def full_stack(self) -> Iterator[None]:
        topped = len(self.decoder.layers) != self.depth
        self.full()
        try:
            yield
        finally:
            if topped:
                self.top()

    def _set(self, layers: torch.nn.ModuleList, n: int, layer_types: list[str] | None) -> None:
        self.decoder.layers = layers
        for config in {id(c): c for c in (self.lm.config, getattr(self.decoder, "config", self.lm.config))}.values():
            config.num_hidden_layers = n
            if layer_types is not None:
                config.layer_types = layer_types

    @torch.no_grad()
    def cache(self, ids: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 16,
              on_batch: Any = None) -> torch.Tensor:
        """Hidden states entering layer L-k for every row, from the frozen bottom only: a hook on
        layer L-k takes its input and stops the pass there, so the top layers never run.

        Rows of one workload share a long prefix (system prompt and tool list, about half of each
        row). Causal attention makes the prefix's states the same in every row, so the prefix runs
        once and each batch runs only its suffixes on top of the prefix's keys and values
        (`shared_prefix`); the result is the same up to float rounding (tests/test_dp_training.py)."""
        captured: list[torch.Tensor] = []

        def stop_here(_module: Any, args: tuple, kwargs: dict) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _Stop

        def run(**inputs: Any) -> torch.Tensor:
            try:
                self.decoder(**inputs)
            except _Stop:
                pass
            return captured.pop()

        with self.full_stack():
            handle = self.layers[self.start].register_forward_pre_hook(stop_here, with_kwargs=True)
            try:
                width = self.shared_prefix(ids, mask)
                if width:
                    prefix_kv = DynamicCache()
                    prefix_states = run(input_ids=ids[:1, :width], use_cache=True, past_key_values=prefix_kv)
                    prefix_kv = [(layer.keys, layer.values) for layer in prefix_kv.layers[:self.start]]
                out = None
                # Rows in length order, each batch cut at its own longest row: real requests' rows run
                # from ~150 to ~1,000 tokens, and a batch padded to the data's longest row costs that.
                # Right padding and causal attention: a position never sees the padding after it, so
                # the states of real tokens are what a full-width pass gives; padding's stay zero.
                lengths = mask.sum(dim=1)
                order = torch.argsort(lengths, stable=True)
                for i in range(0, len(ids), batch_size):
                    rows = order[i:i + batch_size]
                    end = max(int(lengths[rows].max()), width + 1)
                    if width:
                        past = expanded_cache(prefix_kv, len(rows))
                        suffix = run(input_ids=ids[rows, width:end], attention_mask=mask[rows, :end],
                                     use_cache=True, past_key_values=past)
                        states = torch.cat([prefix_states.expand(len(rows), -1, -1), suffix], dim=1)
                    else:
                        states = run(input_ids=ids[rows, :end], attention_mask=mask[rows, :end], use_cache=False)
                    if out is None:
                        out = states.new_zeros((len(ids), ids.shape[1], states.shape[-1]))
                    out[rows, :end] = states
                    if on_batch:
                        on_batch(min(i + batch_size, len(ids)))
            finally:
                handle.remove()
        return out

    def shared_prefix(self, ids: torch.Tensor, mask: torch.Tensor, *, min_width: int = 16) -> int:
        """How many leading tokens every row shares (0 when fewer than `min_width`, or when the
        model has sliding-window layers, whose caches this path does not build). Each row keeps at
        least one token of its own, so every suffix has a position to attend from."""
        if not full_attention_only(self.layer_types):
            return 0
        same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)
        width = int(same.long().cumprod(0).sum())
        width = min(width, int(mask.sum(dim=1).min()) - 1)
        return width if width >= min_width else 0


class _Stop(Exception):
    """Ends a forward pass once the cached layer's input is taken."""


def cache_bytes(rows: int, length: int, hidden: int) -> int:
    return rows * length * hidden * 4
