"""A registered model answering OpenAI chat completions on Ray Serve: one application per served model.

What was measured is what is served: the base model with the job's adapter merged into it (no
adapter cost per token), the same matmul precision, the same prompt rendering (evals/prompts.py),
the same schema-constrained decoding of tool calls (evals/grammar.py: the name is one of the
request's tools, the arguments satisfy its schema) and the same decoder (evals/generation.py,
evals/decode.py), as the job's evaluation ran them.

Concurrent calls are batched by Serve (`@serve.batch`): calls arriving within `batch_wait_s` of each
other are decoded together, up to `max_batch_size`, and inside a batch the decoder batches
continuously (a finished answer's slot goes to the next prompt at once). Calls arriving while a batch
decodes wait for the next one. Decoding runs on a thread of its own, so the replica keeps receiving.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from ray_app.config import Settings


def app_name(model_id: str) -> str:
    """The Serve application serving `model_id`."""
    return "model-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in model_id)


def example_of(request: dict[str, Any]) -> dict[str, Any]:
    """A chat request as the evaluation's curated example: tool calling when it offers tools."""
    kind = "tool_calling" if request.get("tools") and request.get("tool_choice") != "none" else "generic"
    return {"record": {"request": request}, "workload_type": kind}


def chat_completion(text: str, *, model: str, kind: str, prompt_tokens: int, completion_tokens: int,
                    cut: bool) -> dict[str, Any]:
    """The decoded text as an OpenAI ChatCompletion: tool calls when the answer holds calls, else content;
    `cut`: the token budget ended it (finish_reason "length", as OpenAI says; the calls written whole before
    the cut are kept, else the text as far as it got)."""
    from evals.prompts import parse_tool_calls

    calls = parse_tool_calls(text) if kind == "tool_calling" else []
    if calls:
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]}
        finish = "length" if cut else "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": text}, "length" if cut else "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class ModelServer:
    def __init__(self, settings: Settings, model: dict[str, Any]):
        import torch
        from peft import PeftModel

        from evals.models import load_model
        from evals.precision import for_generation

        self.settings = settings
        self.model_id = model["id"]

        gateway = self.settings.gateway
        # the answer budget the evaluation measured it with (its training answers' length); a caller's
        # max_tokens may ask for more, up to gateway.max_new_tokens
        self.default_tokens = min(model.get("max_new_tokens") or gateway.max_new_tokens, gateway.max_new_tokens)
        torch.set_num_threads(max(1, int(gateway.model_num_cpus)))
        base, self.tokenizer = load_model(model["base_model"], self.settings.data_dir)
        merged = PeftModel.from_pretrained(base, model["adapter"]).merge_and_unload()
        merged.eval()
        self.model = for_generation(merged, self.settings.evaluation.matmul_dtype)
        self.constrained = self.settings.evaluation.constrained
        self.max_prompt_tokens = self.settings.training.max_seq_len * 2
        self.batch_size = gateway.max_batch_size  # decoder slots
        # Serve hands over up to 4x the slots at once: the decoder refills a slot the moment an answer
        # ends, so a batch larger than its slots keeps every slot busy until the queue runs dry.
        self._complete_batch.set_max_batch_size(4 * gateway.max_batch_size)
        self.heads: dict = {}  # the workload's prompt head, run once and kept (evals/decode.py SharedHead)
        self._complete_batch.set_batch_wait_timeout_s(gateway.batch_wait_s)
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.served, self.batches, self.decoded_tokens, self.decode_seconds = 0, 0, 0, 0.0

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat request body (the gateway checked its shape) -> a ChatCompletion."""
        return await self._complete_batch(request)

    def stats(self) -> dict[str, Any]:
        """Calls answered, and tokens per second of decoding (the replica's own rate, without the HTTP path)."""
        return {"model": self.model_id, "served": self.served, "batches": self.batches,
                "decoded_tokens": self.decoded_tokens,
                "decode_seconds": round(self.decode_seconds, 3)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _complete_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self._decoder, self._complete, requests)

    def _complete(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cap = self.settings.gateway.max_new_tokens
        budgets = [min(r.get("max_completion_tokens") or r.get("max_tokens") or self.default_tokens, cap)
                   for r in requests]
        started = time.perf_counter()
        answers: list[dict[str, Any]] = [{}] * len(requests)
        for budget in sorted(set(budgets)):  # one decode per budget: usually one, the default
            rows = [i for i, b in enumerate(budgets) if b == budget]
            for i, answer in zip(rows, self._decode([requests[i] for i in rows], budget), strict=True):
                answers[i] = answer
        self.served += len(requests)
        self.batches += 1
        self.decode_seconds += time.perf_counter() - started
        self.decoded_tokens += sum(a["usage"]["completion_tokens"] for a in answers)
        return answers

    def _decode(self, requests: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
        from evals.generation import generate
        from evals.grammar import grammars_for
        from evals.prompts import build_messages, render_prompt

        examples = [example_of(r) for r in requests]
        prompts = [render_prompt(self.tokenizer, build_messages(e)) for e in examples]
        outputs, stats = generate(self.model, self.tokenizer, prompts, batch_size=self.batch_size,
                                  max_new_tokens=budget, max_prompt_tokens=self.max_prompt_tokens,
                                  grammars=grammars_for(examples) if self.constrained else None, heads=self.heads)
        return [chat_completion(text, model=self.model_id, kind=e["workload_type"], prompt_tokens=self._count(p),
                                completion_tokens=n, cut=n >= budget)
                for text, e, p, n in zip(outputs, examples, prompts, stats["new_tokens"], strict=True)]

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def model_app(settings: Settings, model: dict[str, Any]) -> serve.Application:
    """The Serve application for one registered model, sized from `gateway` settings."""
    gateway = settings.gateway
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": gateway.model_num_cpus,
                                                     "num_gpus": gateway.model_num_gpus}}
    if gateway.model_max_replicas:
        options["autoscaling_config"] = {"min_replicas": gateway.model_replicas,
                                         "max_replicas": gateway.model_max_replicas,
                                         "target_ongoing_requests": gateway.max_batch_size}
    else:
        options["num_replicas"] = gateway.model_replicas
    return ModelServer.options(**options).bind(settings, model)
