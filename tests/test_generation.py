"""Batched generation: the shared prompt head runs once, continuous batching refills finished rows,
and neither changes the outputs; bf16 matmuls where asked."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

import evals.decode as decoding
import evals.generation as generation
from evals.decode import SharedHead, decode
from evals.evaluate import prompts_for
from evals.models import load_model
from evals.precision import Bf16Linear, for_generation, native_bf16, resolve, training_autocast
from ray_app.errors import ConfigError
from ray_app.pipeline.curation import curate
from tests.workloads import customer_service_records, generic_records


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model):
    """The tiny model with weights redrawn large, and prompts cut before the assistant marker: its
    greedy answers then differ from prompt to prompt (as built, it repeats one token for every
    prompt), so comparing two decoding paths' answers can fail."""
    model, tokenizer = load_model(tiny_model, "/nonexistent")
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 0.5)
    examples, _ = curate(customer_service_records(12, seed=4), workload_type="tool_calling")
    prompts = [p.removesuffix("<|end|><|assistant|>") for p in prompts_for(tokenizer, examples)]
    return model, tokenizer, prompts


def test_the_shared_head_runs_once_and_the_outputs_are_the_plain_paths(model_and_prompts, monkeypatch):
    model, tokenizer, prompts = model_and_prompts
    head = SharedHead.build(model, tokenizer, prompts, 512, max_new_tokens=12)
    assert head is not None and len(head.ids) >= 40  # the system prompt and the tool list
    assert all(len(tail) >= 1 for tail in head.tails)

    shared, shared_stats = generation.generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=12)
    monkeypatch.setattr(generation.SharedHead, "build", classmethod(lambda cls, *args, **kwargs: None))
    plain, plain_stats = generation.generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=12)
    one_by_one, _ = generation.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=12)
    assert shared == plain == one_by_one
    assert len(set(shared)) >= len(prompts) - 2  # answers that depend on the prompt
    assert shared_stats["generated_tokens"] == plain_stats["generated_tokens"] > 0


def test_prompts_without_a_long_common_head_take_the_plain_path(model_and_prompts):
    model, tokenizer, _ = model_and_prompts
    examples, _ = curate(generic_records(4, seed=2), workload_type="generic")
    prompts = ["Hello there, how are you?", "Why is the sky blue?"]
    assert SharedHead.build(model, tokenizer, prompts, 512, max_new_tokens=12) is None
    assert SharedHead.build(model, tokenizer, prompts_for(tokenizer, examples)[:1], 512, max_new_tokens=6) is None
    long_prompts = prompts_for(tokenizer, curate(customer_service_records(3, seed=4), workload_type="tool_calling")[0])
    # truncation would cut the head
    assert SharedHead.build(model, tokenizer, long_prompts, 8, max_new_tokens=6) is None
    outputs, stats = generation.generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=6)
    assert len(outputs) == 2 and stats["prompts"] == 2


def _stop_that_staggers(results: dict[int, tuple[list[int], float]]) -> int:
    """A token whose first appearance ends the rows at the most different steps."""
    firsts: dict[int, dict[int, int]] = defaultdict(dict)
    for prompt, (tokens, _) in results.items():
        for i, token in enumerate(tokens):
            firsts[token].setdefault(prompt, i)
    return max(firsts, key=lambda t: len(set(firsts[t].values())) + (len(results) > len(firsts[t])))


def test_finished_rows_give_their_slots_to_the_next_prompts(model_and_prompts, monkeypatch):
    """Rows ending at different steps: every later prompt joins mid-run, the buffer drops dead
    columns and opens gaps for longer tails, and every answer is the one-prompt-at-a-time answer."""
    model, tokenizer, prompts = model_and_prompts
    head = SharedHead.build(model, tokenizer, prompts, 512, max_new_tokens=12)
    order = sorted(range(len(prompts)), key=lambda i: len(head.tails[i]))
    stop = _stop_that_staggers(decode(model, head, order, slots=3, max_new_tokens=10, stop_ids=[],
                                      pad_id=tokenizer.pad_token_id))
    calls: dict[str, int] = defaultdict(int)
    for name in ("_drop_dead_columns", "_open_gap", "_keep", "_read"):
        original = getattr(decoding._Decoder, name)
        monkeypatch.setattr(decoding._Decoder, name,
                            lambda self, *a, _o=original, _n=name: (calls.__setitem__(_n, calls[_n] + 1),
                                                                    _o(self, *a))[1])
    for stops in ([stop], []):  # answers ending at different steps; every answer at full length
        done: list[int] = []
        continuous = decode(model, head, order, slots=2, max_new_tokens=10, stop_ids=stops,
                            pad_id=tokenizer.pad_token_id, on_done=done.append)
        alone = generation._fixed_batches(model, tokenizer, prompts, order, batch_size=1, max_new_tokens=10,
                                          max_prompt_tokens=512, stop_ids=stops, should_stop=None, on_batch=None)
        assert {p: tokens for p, (tokens, _) in continuous.items()} == {p: tokens for p, (tokens, _) in alone.items()}
        assert len(done) == len(prompts) and all(seconds > 0 for _, seconds in continuous.values())
        if stops:
            assert len({len(tokens) for tokens, _ in continuous.values()}) >= 3  # rows did end at different steps
    assert calls["_drop_dead_columns"] >= 1 and calls["_open_gap"] >= 1 and calls["_keep"] >= 2
    assert calls["_read"] == 2 * -(-len(prompts) // 2)  # tails read 2 at a time, not one by one


def test_cancelling_stops_before_the_next_prompts_are_read(model_and_prompts):
    model, tokenizer, prompts = model_and_prompts
    reads = []

    def should_stop():
        reads.append(1)
        if len(reads) == 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        generation.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=4, should_stop=should_stop)
    assert len(reads) == 2


def test_bf16_matmuls_replace_every_linear_layer_and_keep_the_answers_close(tiny_model):
    model, tokenizer = load_model(tiny_model, "/nonexistent")
    ids = tokenizer(["Where is my order ORD-1234?"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert for_generation(model, "float32") is model and sum(isinstance(m, Bf16Linear) for m in model.modules()) == 0
    for_generation(model, "bfloat16")
    assert sum(isinstance(m, Bf16Linear) for m in model.modules()) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32  # the residual stream stays float32
    # bf16 keeps 8 significant bits (u = 2**-8, 0.4%), and every CPU does the same arithmetic with
    # them: weights and inputs rounded to bf16, products summed in float32, the output rounded to
    # bf16, natively (AVX512-BF16, AMX) or emulated. Kernels differ only by that last rounding (0.27%
    # of the largest logit between this CPU's AVX512-BF16 and oneDNN held to AVX2). Nine linears in
    # a row here (2 layers x q/k or v, o, gate/up, down; the head) round 27 times: 10% in the worst
    # case, 2% as independent errors add (sqrt(27)·u); measured 0.3%. A wrong or missing weight moves
    # the logits by their whole size.
    assert torch.allclose(logits, reference, rtol=0, atol=0.05 * reference.abs().max().item())
    outputs, stats = generation.generate(model, tokenizer, ["Hello", "Why?"], batch_size=2, max_new_tokens=4)
    assert len(outputs) == 2 and stats["generated_tokens"] > 0


def test_auto_matmul_dtype_follows_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("FLYWHEEL_NATIVE_BF16", raising=False)  # the flags, not a run's override
    with_bf16, without = tmp_path / "zen4", tmp_path / "old"
    with_bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert native_bf16(with_bf16) and not native_bf16(without) and not native_bf16(tmp_path / "missing")
    monkeypatch.setattr("evals.precision.native_bf16", lambda: False)
    assert resolve("auto") == "float32" and resolve("bfloat16") == "bfloat16"
    monkeypatch.setattr("evals.precision.native_bf16", lambda: True)
    assert resolve("auto") == "bfloat16" and resolve("float32") == "float32"


def test_flywheel_native_bf16_overrides_the_cpus_flags(tmp_path, monkeypatch):
    """FLYWHEEL_NATIVE_BF16 forces either path for a whole run, whatever the CPU has."""
    with_bf16 = tmp_path / "zen4"
    with_bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("FLYWHEEL_NATIVE_BF16", "0")
    assert not native_bf16(with_bf16) and resolve("auto") == "float32"
    assert not isinstance(training_autocast("cpu", "auto"), torch.autocast)
    monkeypatch.setenv("FLYWHEEL_NATIVE_BF16", "1")
    assert native_bf16(tmp_path / "missing") and resolve("auto") == "bfloat16"
    assert isinstance(training_autocast("cpu", "auto"), torch.autocast)
    for value in ("", "yes", "true", " 1"):
        monkeypatch.setenv("FLYWHEEL_NATIVE_BF16", value)
        with pytest.raises(ConfigError, match=re.escape(repr(value))):
            native_bf16(with_bf16)


def test_training_autocasts_to_bf16_on_cuda_and_where_the_cpu_multiplies_it(monkeypatch):
    monkeypatch.setattr("evals.precision.native_bf16", lambda: False)
    assert not isinstance(training_autocast("cpu", "auto"), torch.autocast)
    cuda = training_autocast("cuda", "auto")  # CUDA multiplies bf16 natively whatever the host CPU
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.bfloat16 and cuda.device == "cuda"
    monkeypatch.setattr("evals.precision.native_bf16", lambda: True)
    assert isinstance(training_autocast("cpu", "auto"), torch.autocast)
    assert not isinstance(training_autocast("cpu", "float32"), torch.autocast)
    assert not isinstance(training_autocast("cuda", "float32"), torch.autocast)
    with training_autocast("cpu", "bfloat16"):
        product = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert product.dtype == torch.bfloat16


def _tiny_gemma(tokenizer, sliding_window: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=sliding_window,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=None)
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 1.0)
        # Gemma scales its (tied) embeddings up, so as drawn every answer would repeat the prompt's
        # last token; small embeddings let attention decide.
        model.get_input_embeddings().weight.normal_(0, 0.02)
    return model


def test_sliding_window_layers_decode_continuously_while_no_column_reaches_the_window(model_and_prompts):
    """Gemma 3's local layers: within the window they are full attention, so the plain buffer is
    exact (same answers as the model's own cache); past it the fixed-batch path takes over."""
    _, tokenizer, _ = model_and_prompts
    records = customer_service_records(12, seed=4)
    for record in records:  # a short head: with six tools the random model's answers all come out alike
        record["request"]["tools"] = record["request"]["tools"][:1]
    examples, _ = curate(records, workload_type="tool_calling")
    prompts = [p.removesuffix("<|end|><|assistant|>") for p in prompts_for(tokenizer, examples)]
    model = _tiny_gemma(tokenizer, sliding_window=512)
    head = SharedHead.build(model, tokenizer, prompts, 512, max_new_tokens=10)
    assert head is not None
    order = list(range(len(prompts)))
    continuous = decode(model, head, order, slots=3, max_new_tokens=10, stop_ids=[], pad_id=tokenizer.pad_token_id)
    alone = generation._fixed_batches(model, tokenizer, prompts, order, batch_size=1, max_new_tokens=10,
                                      max_prompt_tokens=512, stop_ids=[tokenizer.eos_token_id], should_stop=None,
                                      on_batch=None)
    assert {p: t for p, (t, _) in continuous.items()} == {p: t for p, (t, _) in alone.items()}
    assert len({tuple(t) for t, _ in continuous.values()}) >= len(prompts) // 2  # answers that depend on the prompt

    narrow = _tiny_gemma(tokenizer, sliding_window=64)  # the head alone is longer than 64 tokens
    assert SharedHead.build(narrow, tokenizer, prompts, 512, max_new_tokens=10) is None
    outputs, stats = generation.generate(narrow, tokenizer, prompts[:3], batch_size=2, max_new_tokens=4)
    assert len(outputs) == 3 and stats["generated_tokens"] > 0
