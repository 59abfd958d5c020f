"""The gateway's cost to a caller, and a served model's throughput against the offline decoder (issue 34's bar).

1. `off` mode against calling the same upstream directly, same run, rounds alternated: p50 and p99.
2. The caller's p99 in `shadow` (the model answers each call off the hot path) against `off`.
3. SmolLM2 served through the gateway (`live`) at 1, 4 and 16 concurrent callers: generated tokens
   per second of wall time, against `evals.generation.generate` (the evaluation's decoder) on the same
   prompts in this process, with the same threads, budget and grammar.

The served adapter is a freshly initialized LoRA (B = 0, so the merged weights are SmolLM2's own):
what is measured here is serving speed, which the adapter's values do not change; what a trained
adapter answers is tests/bench/bench_flywheel.py's and bench_realistic.py's.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

from ray_app.storage import open_log_store
from tests.bench.harness import ADMIN_KEY, start_app
from tests.openai_upstream import Upstream
from tests.workloads import customer_service_records

WORKLOAD, CLIENT = "bench-gateway", "acme"
MODEL = "smollm2-135m"
THREADS = 2
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Flywheel-Workload-Id": WORKLOAD, "X-Flywheel-Client-Id": CLIENT}


def _requests(n: int) -> list[dict]:
    return [{"model": "gpt-big", **r["request"]} for r in customer_service_records(n, seed=5)]


def _latencies(client: httpx.Client, url: str, bodies: list[dict], headers: dict) -> list[float]:
    out = []
    for body in bodies:
        started = time.perf_counter()
        response = client.post(url, json=body, headers=headers)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text[:200]
    return out


def _alternated(client: httpx.Client, upstream_url: str, gateway_url: str, bodies: list[dict],
                rounds: int = 6) -> tuple[list[float], list[float], list[float]]:
    """Latencies calling the upstream directly, a no-op Serve endpoint (Serve's own floor), the gateway."""
    direct, floor, through = [], [], []
    for _ in range(rounds):
        direct += _latencies(client, f"{upstream_url}/chat/completions", bodies, {})
        floor += _latencies(client, f"{gateway_url}/noop", bodies, {})
        through += _latencies(client, f"{gateway_url}/v1/chat/completions", bodies, HEADERS)
    return direct, floor, through


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def _register_smollm2(settings) -> str:
    """An untrained LoRA on SmolLM2 (see the module docstring), registered as a job's model would be."""
    from peft import LoraConfig, get_peft_model

    from evals.models import load_model
    from ray_app.registry import register
    from ray_app.storage import open_job_store

    model, _ = load_model(MODEL, settings.data_dir)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    folder = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    peft.save_pretrained(folder)
    job = {"id": "bench", "workload_id": WORKLOAD, "client_id": CLIENT}
    entry = register(open_job_store(settings), data_dir=settings.data_dir, job=job, base_model=MODEL, adapter=folder,
                     workload_type="tool_calling", train_ids=[], splits={}, training={"epsilon": 8.0, "delta": 1e-5},
                     scores={"function_name_accuracy": 1.0, "compliance_rate": 1.0}, accuracy_ratio=1.0,
                     promotion=None, max_new_tokens=48)
    return entry["id"]


def _served_rate(url: str, bodies: list[dict], callers: int) -> float:
    """Generated tokens per second of wall time with `callers` concurrent callers, each in turn."""
    async def go() -> int:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=600,
                                    default_headers={k: v for k, v in HEADERS.items() if k != "Authorization"})
        queue = list(bodies)
        tokens = 0

        async def caller() -> None:
            nonlocal tokens
            while queue:
                body = queue.pop()
                answer = await client.chat.completions.create(**body)
                tokens += answer.usage.completion_tokens
        await asyncio.gather(*(caller() for _ in range(callers)))
        return tokens
    started = time.perf_counter()
    tokens = asyncio.run(go())
    return tokens / (time.perf_counter() - started)


def _drained(logs, total: int, timeout: float = 600) -> list[dict]:
    """The workload's records once `total` are stored (each is written after its side answer came)."""
    deadline = time.monotonic() + timeout
    while logs.count(WORKLOAD, CLIENT) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    return logs.query(workload_id=WORKLOAD, client_id=CLIENT, limit=total)


def _offline_rate(settings, model_id: str, bodies: list[dict]) -> float:
    import torch
    from peft import PeftModel

    from evals.generation import generate
    from evals.grammar import grammars_for
    from evals.models import load_model
    from evals.precision import for_generation
    from evals.prompts import build_messages, render_prompt
    from ray_app.registry import get_model
    from ray_app.storage import open_job_store
    from serve.model_server import example_of

    torch.set_num_threads(THREADS)
    entry = get_model(open_job_store(settings), model_id)
    base, tokenizer = load_model(MODEL, settings.data_dir)
    model = for_generation(PeftModel.from_pretrained(base, entry["adapter"]).merge_and_unload().eval(),
                           settings.evaluation.matmul_dtype)
    examples = [example_of(b) for b in bodies]
    prompts = [render_prompt(tokenizer, build_messages(e)) for e in examples]
    rates = []
    for _ in range(2):
        _, stats = generate(model, tokenizer, prompts, batch_size=settings.gateway.max_batch_size,
                            max_new_tokens=entry["max_new_tokens"], grammars=grammars_for(examples))
        rates.append(stats["tokens_per_second"])
    return statistics.median(rates)


def run() -> list[dict]:
    rows = []
    with Upstream() as upstream:
        url, settings = start_app(gateway={"upstream_url": upstream.url, "model_num_cpus": THREADS,
                                           "route_cache_s": 1.0})
        bodies = _requests(50)
        with httpx.Client(timeout=60) as client:
            _alternated(client, upstream.url, url, bodies[:10], rounds=1)  # warm both paths
            direct, floor, through = _alternated(client, upstream.url, url, bodies)
            for q in (50, 99):
                d, f, t = _pct(direct, q), _pct(floor, q), _pct(through, q)
                rows.append({"benchmark": "gateway", "metric": f"off mode p{q}: gateway / direct upstream",
                             "value": t / d, "unit": "x", "goal": "<= 1.05x + 2 ms",
                             "note": f"{t:.2f} ms vs {d:.2f} ms; {'PASS' if t <= 1.05 * d + 2 else 'MISS'}; "
                                     f"a no-op Serve endpoint alone: {f:.2f} ms"})
                rows.append({"benchmark": "gateway", "metric": f"off mode p{q}: gateway - (no-op Serve + upstream)",
                             "value": t - f - d, "unit": "ms", "goal": "", "note": "the gateway's own work"})
            model_id = _register_smollm2(settings)
            change = client.post(f"{url}/v1/routes", headers=HEADERS, timeout=600, json={
                "workload_id": WORKLOAD, "client_id": CLIENT, "model": model_id, "mode": "shadow"})
            assert change.status_code == 200, change.text
            time.sleep(1.5)  # every ingress replica's route cache
            logs = open_log_store(settings)
            before = logs.count(WORKLOAD, CLIENT)
            _, _, shadow = _alternated(client, upstream.url, url, bodies, rounds=2)
            shadows = _drained(logs, before + len(shadow))  # side answers still decoding: let them end
            skipped = sum(1 for r in shadows if r.get("shadow", {}).get("skipped"))
            s99, o99 = _pct(shadow, 99), _pct(through, 99)  # off: measured above, same run
            rows.append({"benchmark": "gateway", "metric": "shadow mode caller p99 / off mode p99", "value": s99 / o99,
                         "unit": "x", "goal": "<= 1.05", "note": f"{s99:.2f} ms vs {o99:.2f} ms; "
                         f"{'PASS' if s99 <= 1.05 * o99 else 'MISS'} (the model decodes on the same 2 cores); "
                         f"{skipped} of {len(shadow)} side answers skipped (max_side_calls in flight)"})
            change = client.post(f"{url}/v1/routes", headers=HEADERS, timeout=600, json={
                "workload_id": WORKLOAD, "client_id": CLIENT, "model": model_id, "mode": "live", "mirror": 0.0})
            assert change.status_code == 200, change.text
            time.sleep(1.5)
        prompts = _requests(32)
        offline = _offline_rate(settings, model_id, prompts)
        rows.append({"benchmark": "gateway", "metric": "offline decoder tokens/s (evaluation's generate)",
                     "value": offline, "unit": "tok/s", "goal": "", "note": f"{len(prompts)} prompts, batch "
                     f"{settings.gateway.max_batch_size}, {THREADS} threads, grammar on"})
        from ray import serve

        from serve.model_server import app_name

        replica = serve.get_app_handle(app_name(model_id))
        for callers in (1, 4, 16):
            before = replica.stats.remote().result()
            rate = _served_rate(url, prompts[:8] if callers == 1 else prompts, callers)
            after = replica.stats.remote().result()
            inside = (after["decoded_tokens"] - before["decoded_tokens"]) / max(
                1e-9, after["decode_seconds"] - before["decode_seconds"])
            per_batch = (after["served"] - before["served"]) / max(1, after["batches"] - before["batches"])
            rows.append({"benchmark": "gateway", "metric": f"served tokens/s, {callers} concurrent callers",
                         "value": rate, "unit": "tok/s", "goal": ">= 0.9x offline" if callers == 16 else "",
                         "note": f"{rate / offline:.2f}x offline; the replica decoding: {inside:.0f} tok/s, "
                                 f"{per_batch:.1f} calls a batch" + (
                             f"; {'PASS' if rate >= 0.9 * offline else 'MISS'}" if callers == 16 else "")})
    return rows
