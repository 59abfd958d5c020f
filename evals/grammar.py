"""Schema-constrained tool calls: the model can only write a call the request's tools accept.

Free decoding lets a small model invent names from the user's words ("With You") and write
arguments of the wrong type, though it ranks the right tool first far more often than its free
text shows. So every tool-calling answer is decoded under a grammar built from the request's own
`tools`: one or more calls, one JSON object a line (parallel calls), each `{"name": N,
"arguments": A}` where N is one of the offered names and A satisfies that tool's JSON schema
(types, enums, required keys, no invented keys). The grammar is compiled by llguidance (the
engine vLLM and SGLang use) and applied as a token mask before each greedy pick, in the
continuous-batching decoder (evals/decode.py) and in `model.generate` alike.

Keys are written in the schema's property order and items as `, ` / `: ` (the form
`evals.prompts.render_tool_call` trains on), so what training teaches is what decoding allows.
A schema llguidance cannot compile (a service's tool list is not ours to fix) falls back to the
names alone with free-form arguments; a request without tools decodes free.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import LogitsProcessor

SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def _arguments_schema(parameters: Any, strict: bool) -> dict[str, Any]:
    """A tool's `parameters` as the schema of a call's arguments: an object with no invented keys."""
    if not strict or not isinstance(parameters, dict):
        return {"type": "object"}
    schema = copy.deepcopy(parameters)
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    schema.setdefault("additionalProperties", False)
    return schema


def tool_call_grammar(tools: Sequence[dict[str, Any]] | None, *, strict: bool = True) -> str | None:
    """The Lark grammar of an answer to a request offering `tools`: calls, one a line; None without tools."""
    variants = []
    for tool in tools or []:
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        variants.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                         "properties": {"name": {"const": fn["name"]},
                                        "arguments": _arguments_schema(fn.get("parameters"), strict)}})
    if not variants:
        return None
    schema = {"anyOf": variants, "x-guidance": SEPARATORS}
    return 'start: call ("\\n" call)*\ncall: %json ' + json.dumps(schema)


class Constrainer:
    """Token masks for a batch of prompts, each under its own grammar (None: free).

    `pick(prompts, logits)` is the decoders' greedy step: mask each constrained row's logits to the
    tokens its grammar allows next, take the argmax, and advance that row's matcher by it."""

    def __init__(self, tokenizer: Any, grammars: Sequence[str | None], *, vocab_size: int,
                 stop_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        lt = _ll_tokenizer(tokenizer, vocab_size, tuple(stop_ids))
        built = [_matcher(lt, g) for g in grammars]
        self.matchers: list[llguidance.LLMatcher | None] = [m for m, _ in built]
        self.fallbacks = sum(loosened for _, loosened in built)  # schemas the engine rejected
        self._mask = torch.empty(self.words, dtype=torch.int32)

    def allowed(self, prompt: int) -> torch.Tensor | None:
        """The tokens prompt `prompt`'s grammar allows next (bool [vocab_size]); None: any."""
        matcher = self.matchers[prompt]
        if matcher is None or matcher.is_error():
            return None
        matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self.words * 4)
        bits = np.unpackbits(self._mask.numpy().view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def mask_(self, prompts: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """`logits` [rows, vocab] with every token row i's grammar forbids set to -inf (in place)."""
        for row, prompt in enumerate(prompts):
            allowed = self.allowed(prompt)
            if allowed is not None:
                logits[row, :self.vocab_size][~allowed] = float("-inf")
        return logits

    def advance(self, prompt: int, token: int) -> None:
        matcher = self.matchers[prompt]
        if matcher is not None and not matcher.is_error() and not matcher.is_stopped():
            matcher.consume_token(token)

    def pick(self, prompts: Sequence[int], logits: torch.Tensor) -> list[int]:
        tokens = self.mask_(prompts, logits.float()).argmax(-1).tolist()
        for prompt, token in zip(prompts, tokens, strict=True):
            self.advance(prompt, token)
        return tokens


_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}


def _ll_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    """llguidance's view of the tokenizer (~0.3 s to build): once per tokenizer in a process."""
    key = (id(tokenizer), vocab_size, stop_ids)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(stop_ids) or None)
    return _TOKENIZERS[key]


def _matcher(lt: Any, grammar: str | None) -> tuple[llguidance.LLMatcher | None, bool]:
    """(a matcher for `grammar`, whether it was loosened): a grammar that does not compile is retried
    with free arguments, and one that still does not decodes free."""
    if grammar is None:
        return None, False
    matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
    if not matcher.is_error():
        return matcher, False
    loose = llguidance.LLMatcher(lt, _loosened(grammar), log_level=0)
    return (None if loose.is_error() else loose), True


def _loosened(grammar: str) -> str:
    """The same calls' names with any object as arguments (a tool schema llguidance rejected)."""
    schema = json.loads(grammar.split("%json ", 1)[1])
    tools = [{"name": v["properties"]["name"]["const"]} for v in schema["anyOf"]]
    return tool_call_grammar(tools, strict=False) or ""


def grammars_for(examples: Sequence[dict[str, Any]]) -> list[str | None]:
    """Each curated example's grammar: its request's tools for tool calling, None (free) otherwise."""
    return [tool_call_grammar(e["record"]["request"].get("tools")) if e["workload_type"] == "tool_calling"
            else None for e in examples]


class GrammarProcessor(LogitsProcessor):
    """`Constrainer` for `model.generate`: at each step, advance each row by the token it just took
    (not after it stopped), then mask its next logits."""

    def __init__(self, constrainer: Constrainer, prompts: Sequence[int], prompt_length: int,
                 stop_ids: Sequence[int]):
        self.constrainer, self.prompts, self.start = constrainer, list(prompts), prompt_length
        self.stop, self.done = set(stop_ids), [False] * len(prompts)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.start:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.done[row] or token in self.stop:
                    self.done[row] = True
                    continue
                self.constrainer.advance(self.prompts[row], token)
        live = [r for r in range(len(self.prompts)) if not self.done[r]]
        if live:
            scores = scores.float()
            sub = scores[live]
            self.constrainer.mask_([self.prompts[r] for r in live], sub)
            scores[live] = sub
        return scores
