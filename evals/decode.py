"""Greedy decoding with continuous batching, over the prompt head that all eval prompts share.

Eval prompts of one workload start with the same long head (system prompt and tool list, about
half of each prompt). `SharedHead` runs it through the model once; every prompt then reads only
its own tail on top of the head's keys and values.

Calling `generate` on fixed batches of 8 wastes the batch: rows that finished early ride along
until the batch's longest answer ends. `decode` instead keeps `slots` rows busy, as serving
engines batch: a row that finishes gives its slot to the next prompt at once. The next `slots`
prompts' tails are read together and wait for free slots (read one by one, a tail costs about
twice as much per token).

Layout: one key/value buffer per layer, [slots, kv_heads, capacity, head_dim], written in place
(the default cache concatenates, copying the whole cache at every step). Columns 0..H-1 hold the
head, the same in every row; every row's own tokens end at the same right edge T, where the next
step writes. A row that joins copies its tail to columns T-t..T-1 and the columns between the
head and its tail are masked out. Rotary positions are applied before keys are cached and each
row passes its own positions, so which column holds a key changes nothing. When T reaches the
capacity, the columns left of the oldest row's first token (no row uses them) are dropped.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


def full_attention_only(layer_types: Sequence[str] | None) -> bool:
    """Whether a shared-prefix cache may be a plain one: sliding-window layers keep their own type."""
    return all(t == "full_attention" for t in layer_types or ())


def expanded_cache(keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A cache of one prefix's keys and values for `rows` rows (views: nothing is copied)."""
    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in keys_values])


@dataclass
class SharedHead:
    """The prompts' common first tokens, run once: their keys and values, and each prompt's own tail."""
    ids: list[int]
    tails: list[list[int]]
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]

    MIN_TOKENS = 16  # below this the bookkeeping costs more than it saves

    @classmethod
    def build(cls, model: Any, tokenizer: Any, prompts: list[str], max_prompt_tokens: int, *,
              max_new_tokens: int, known: SharedHead | None = None) -> SharedHead | None:
        """The prompts' head, run once; `known`: a head run before (a served model's last one), taken
        as is when every prompt starts with it, so a server runs its workload's head once, not per batch."""
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        longest = max(len(i) for i in ids)
        if longest > max_prompt_tokens:
            return None  # left truncation would cut into the head
        width = len(known.ids) if known is not None else 0
        if known is not None and all(len(i) > width and i[:width] == known.ids for i in ids) \
                and _plain_cache_exact(model.config, capacity(width, longest - width, max_new_tokens)):
            return cls(known.ids, [i[width:] for i in ids], known.keys_values)
        if len(prompts) < 2:
            return None
        n = min(len(i) for i in ids) - 1  # every prompt keeps a token of its own
        shared = next((k for k in range(n) if any(i[k] != ids[0][k] for i in ids)), n)
        if shared < cls.MIN_TOKENS or not _plain_cache_exact(model.config,
                                                              capacity(shared, longest - shared, max_new_tokens)):
            return None
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids[0][:shared]]), past_key_values=cache, use_cache=True)
        return cls(ids[0][:shared], [i[shared:] for i in ids], [(layer.keys, layer.values) for layer in cache.layers])


def capacity(head: int, longest_tail: int, max_new_tokens: int) -> int:
    """Buffer columns: room for a row's whole life plus as much again, so dropping dead columns is rare."""
    return head + longest_tail + 2 * max_new_tokens + 1


def _plain_cache_exact(config: Any, columns: int) -> bool:
    """Whether plain caches compute what the model's own would. Sliding-window layers (Gemma 3's
    local ones) see every earlier column while no column index reaches the window, so there they
    are full attention and a plain cache is exact."""
    layer_types = getattr(config, "layer_types", None)
    if full_attention_only(layer_types):
        return True
    window = getattr(config, "sliding_window", None)
    return set(layer_types) <= {"full_attention", "sliding_attention"} and bool(window) and columns <= window


class _BufferLayer(DynamicLayer):
    """A cache layer over a preallocated buffer: `update` writes the new columns in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.key_buffer, self.value_buffer = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


@dataclass
class _Read:
    prompt: int
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [kv_heads, tail, head_dim]
    first: int  # the first generated token
    started: float


@dataclass
class _Row:
    prompt: int
    start: int  # buffer column of the row's first own token
    position: int  # the position of the token fed next
    joined: float
    tokens: list[int]


Pick = Callable[[Sequence[int], torch.Tensor], list[int]]  # (prompts, their rows' logits) -> next tokens


def greedy(prompts: Sequence[int], logits: torch.Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


class _Decoder:
    def __init__(self, model: Any, head: SharedHead, *, slots: int, max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int, pick: Pick = greedy):
        self.model, self.head, self.max_new, self.pad_id, self.pick = model, head, max_new_tokens, pad_id, pick
        self.stop = set(stop_ids)
        self.width = len(head.ids)
        self.capacity = capacity(self.width, max(len(t) for t in head.tails), max_new_tokens)
        self.buffers = []
        for k, v in head.keys_values:
            kb = k.new_zeros((slots, k.shape[1], self.capacity, k.shape[3]))
            vb = v.new_zeros((slots, v.shape[1], self.capacity, v.shape[3]))
            kb[:, :, :self.width], vb[:, :, :self.width] = k, v
            self.buffers.append((kb, vb))
        self.mask = torch.zeros((slots, self.capacity), dtype=torch.long)
        self.mask[:, :self.width] = 1
        self.rows: list[_Row | None] = [None] * slots
        self.end = self.width  # T: the column the next step writes
        self.ready: deque[_Read] = deque()
        self.results: dict[int, tuple[list[int], float]] = {}

    def run(self, order: Sequence[int], should_stop: Callable[[], None] | None,
            on_done: Callable[[int], None] | None) -> dict[int, tuple[list[int], float]]:
        queue = deque(order)
        with torch.inference_mode():
            while True:
                free = [s for s, row in enumerate(self.rows) if row is None]
                if free and (self.ready or queue):
                    if not self.ready:
                        if should_stop is not None:
                            should_stop()
                        self._read([queue.popleft() for _ in range(min(len(self.rows), len(queue)))])
                    self._join(free[0], on_done)
                    continue  # a prompt may end on its first token: fill every slot before stepping
                if free:
                    self._keep([s for s, row in enumerate(self.rows) if row is not None])
                if not self.rows:
                    return self.results
                if self.end == self.capacity:
                    self._drop_dead_columns()
                self._step(on_done)

    def _read(self, prompts: list[int]) -> None:
        """Read the tails of `prompts` together on top of the head: their caches and first tokens
        wait in `ready` for free slots. (One prompt at a time as slots free up would read each tail
        alone, at about twice the cost per token.)"""
        tails = [self.head.tails[p] for p in prompts]
        wide = max(len(t) for t in tails)
        ids = [[self.pad_id] * (wide - len(t)) + t for t in tails]
        mask = [[1] * self.width + [0] * (wide - len(t)) + [1] * len(t) for t in tails]
        positions = [[1] * (wide - len(t)) + list(range(self.width, self.width + len(t))) for t in tails]
        past = expanded_cache(self.head.keys_values, len(tails))
        now = time.perf_counter()
        logits = self.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            position_ids=torch.tensor(positions), past_key_values=past, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        total = self.width + wide
        for j, (prompt, first) in enumerate(zip(prompts, self.pick(prompts, logits), strict=True)):
            n = len(tails[j])
            kv = [(layer.keys[j, :, total - n:total], layer.values[j, :, total - n:total]) for layer in past.layers]
            self.ready.append(_Read(prompt, kv, first, now))

    def _join(self, slot: int, on_done: Callable[[int], None] | None) -> None:
        """The next read prompt takes `slot`: its tail's keys and values end at the right edge."""
        read = self.ready.popleft()
        n = read.keys_values[0][0].shape[1]
        if self.end < self.width + n:
            self._open_gap(self.width + n - self.end)
        start = self.end - n
        for (kb, vb), (k, v) in zip(self.buffers, read.keys_values, strict=True):
            kb[slot, :, start:self.end] = k
            vb[slot, :, start:self.end] = v
        self.mask[slot, self.width:] = 0
        self.mask[slot, start:self.end] = 1
        self.rows[slot] = _Row(read.prompt, start, self.width + n, read.started, [])
        self._take(slot, read.first, on_done)

    def _step(self, on_done: Callable[[int], None] | None) -> None:
        rows = self.rows
        self.mask[:, self.end] = 1
        cache = Cache(layers=[_BufferLayer(kb, vb, self.end) for kb, vb in self.buffers])
        logits = self.model(input_ids=torch.tensor([[row.tokens[-1]] for row in rows]),
                            attention_mask=self.mask[:, :self.end + 1],
                            position_ids=torch.tensor([[row.position] for row in rows]),
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.end += 1
        for slot, token in enumerate(self.pick([row.prompt for row in rows], logits)):
            rows[slot].position += 1
            self._take(slot, token, on_done)

    def _take(self, slot: int, token: int, on_done: Callable[[int], None] | None) -> None:
        """Keep `token` for the row in `slot`, or end the row (a stop token, or the token budget spent)."""
        row = self.rows[slot]
        if token not in self.stop:
            row.tokens.append(token)
        if token in self.stop or len(row.tokens) == self.max_new:
            self.results[row.prompt] = (row.tokens, time.perf_counter() - row.joined)
            self.rows[slot] = None
            if on_done is not None:
                on_done(1)

    def _keep(self, slots: list[int]) -> None:
        """Only these rows go on (no prompt is left to fill the others): later steps skip the rest."""
        index = torch.tensor(slots, dtype=torch.long)
        self.buffers = [(kb[index], vb[index]) for kb, vb in self.buffers]
        self.mask = self.mask[index]
        self.rows = [self.rows[s] for s in slots]

    def _open_gap(self, gap: int) -> None:
        """Move every row's own columns `gap` to the right, so a longer tail fits after the head."""
        self._move_columns(self.width, self.width + gap)

    def _drop_dead_columns(self) -> None:
        """Slide the columns from the oldest row's first token back to the head's end."""
        self._move_columns(min(row.start for row in self.rows), self.width)

    def _move_columns(self, source: int, target: int) -> None:
        """Columns source..T-1 (every row's own tokens) move to start at `target`; a gap opened on the
        left is masked out (columns freed past the new edge are rewritten before a step reads them),
        and the rows' starts and the right edge follow."""
        n, shift = self.end - source, target - source
        for kb, vb in self.buffers:
            kb[:, :, target:target + n] = kb[:, :, source:self.end].clone()
            vb[:, :, target:target + n] = vb[:, :, source:self.end].clone()
        self.mask[:, target:target + n] = self.mask[:, source:self.end].clone()
        self.mask[:, source:target] = 0
        for row in self.rows:
            if row is not None:
                row.start += shift
        self.end += shift


def decode(model: Any, head: SharedHead, order: Sequence[int], *, slots: int, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int, should_stop: Callable[[], None] | None = None,
           on_done: Callable[[int], None] | None = None, pick: Pick = greedy) -> dict[int, tuple[list[int], float]]:
    """prompt index -> (its greedy tokens, stop token excluded; seconds from its first read to its last token).

    At most `slots` prompts are decoded at once, in `order`; `should_stop()` may raise to cancel
    before a prompt starts, `on_done(1)` is called as each prompt ends. `pick` chooses each step's
    tokens from the rows' logits (greedy; evals/grammar.py's `Constrainer.pick` masks them first)."""
    slots = max(1, min(slots, len(order)))
    return _Decoder(model, head, slots=slots, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                    pad_id=pad_id, pick=pick).run(order, should_stop, on_done)
