"""The training loop's machinery with a tiny model: the cached-bottom path is exact, DP across two
Ray Train workers spends what an independent accountant says, a killed worker resumes from its
checkpoint, and the two up-front refusals speak in sentences. The clipping modes are
tests/test_dp_clipping.py's; whether a real model learns is measured in tests/bench/bench_dp.py."""
from __future__ import annotations

import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from ray_app.config import LoraConfig, PrivacyConfig, Settings
from tests.workloads import customer_service_records
from train import dp
from train.data import load_split
from train.lora import lora_config, train_lora
from train.run_config import ProfileConfig, TrainRun
from train.tail import AnswerLoss, LayerWindow, causal_lm

PRIVACY = PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, max_noise_ratio=0.5)


def write_split(folder: Path, n: int, seed: int) -> Path:
    examples = [{"id": r["id"], "record": r, "workload_type": "tool_calling"}
                for r in customer_service_records(n, seed=seed)]
    path = folder / f"split-{n}-{seed}.json"
    path.write_text(json.dumps(examples))
    return path


def peft_tiny(tiny_model: str, top_layers: int = 1):
    from peft import get_peft_model

    from evals.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_model, "/nonexistent")
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=None, top_layers=top_layers)
    peft_model = get_peft_model(model, lora_config(model, lora))
    for name, p in peft_model.named_parameters():  # LoRA B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft_model, tokenizer


EPS32 = torch.finfo(torch.float32).eps  # 2**-23, float32's relative spacing: twice its unit roundoff u
RANK = 4  # peft_tiny's LoRA rank


def float32_sums(tiny_model: str, tokens: int, records: int, *, backward: bool = True) -> int:
    """The terms of the float32 sums from a batch to its loss (and back to the adapter's gradient),
    added along the way: two runs differ by at most this times EPS32, at the scale of the terms
    taken in absolute value, in whatever order (kernel, slicing, CPU) each runs its sums.

    A sum of n float32 terms, in any order or blocking, is within n·u of the exact sum times the
    sum of the terms' absolute values (Higham, Accuracy and Stability of Numerical Algorithms,
    2002, §3.1); along a chain of sums the lengths add (to first order); two runs differ by twice
    that, n·EPS32. Per layer the forward runs two RMSNorms (hidden), four projections in a row
    (q/k/v, o, gate/up over hidden, down over intermediate, each adapter adding its rank) and
    attention (scores over the head dimension, softmax and weighted values over tokens); then the
    final norm and the tied head (hidden), the softmax over the vocabulary, the loss's sums over
    tokens and records. The backward runs the same sums transposed, and a weight's gradient sums
    the products of every record's tokens.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    h, i = config.hidden_size, config.intermediate_size
    layer = 2 * h + 3 * (h + RANK) + (i + RANK) + h // config.num_attention_heads + 2 * tokens
    forward = config.num_hidden_layers * layer + 2 * h + config.vocab_size + tokens + records
    return 2 * forward + records * tokens if backward else forward


def absolute_gradient(peft_model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The adapter's plain gradient with every token's product in absolute value, in float64: the
    scale `float32_sums` bounds its last sums at (a weight whose gradient is small because its
    records and tokens cancel still carries their rounding)."""
    scales = {}

    def keep(linear, args, out):
        x = args[0].detach().double().abs()
        out.register_hook(lambda g: scales.update({linear.weight: torch.einsum("...o,...i->oi", g.double().abs(), x)}))

    trained = [p for p in peft_model.parameters() if p.requires_grad]
    hooks = [m.register_forward_hook(keep) for m in peft_model.modules()
             if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    AnswerLoss(peft_model)(ids, labels, mask).backward()
    for hook in hooks:
        hook.remove()
    peft_model.zero_grad(set_to_none=True)
    return [scales[p] for p in trained]


def test_cached_bottom_gives_the_full_models_loss_and_gradients(tiny_model, tmp_path):
    peft_model, tokenizer = peft_tiny(tiny_model)
    ids, labels, mask = load_split(write_split(tmp_path, 6, seed=3), tokenizer, 1024)  # prompts whole
    scales = absolute_gradient(peft_model, ids, labels, mask)
    loss_module = AnswerLoss(peft_model)
    full = loss_module(ids, labels, mask)
    full.backward()
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    full_grads = [p.grad.clone() for p in trained]
    peft_model.zero_grad()

    window = LayerWindow(causal_lm(peft_model), 1)
    assert window.shared_prefix(ids, mask) > 16  # the bottom runs the shared prompt once, then each suffix
    hidden = window.cache(ids, mask, batch_size=4)  # a full batch and a part one
    # without the shared prompt (each request's own tools): every batch cut at its own longest row
    window.shared_prefix = lambda *_: 0
    unshared = window.cache(ids, mask, batch_size=4)
    real = mask.bool()
    states_tol = float32_sums(tiny_model, tokens=ids.shape[1], records=1, backward=False) * EPS32
    assert (unshared[real] - hidden[real]).abs().max() <= states_tol * hidden[real].abs().max()
    window.top()
    assert len(causal_lm(peft_model).get_decoder().layers) == 1
    cached = loss_module(hidden, labels, mask)
    cached.backward()
    # the bottom runs in other shapes (the shared prompt once, batches of 4): other sums' orders.
    # The loss's terms are cross entropies, none negative: bounded relative to the loss itself
    sums = float32_sums(tiny_model, tokens=ids.shape[1], records=len(ids), backward=False)
    assert cached.item() == pytest.approx(full.item(), rel=sums * EPS32)
    tol = float32_sums(tiny_model, tokens=ids.shape[1], records=len(ids)) * EPS32  # ~7e-4
    for p, expected, scale in zip(trained, full_grads, scales, strict=True):
        assert (p.grad - expected).abs().max() <= tol * scale.max()

    # the loss is the plain answer-token cross entropy of the model's own logits
    window.full()
    logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                  reduction="none")
    expected = per_token.sum(1).mean()  # nats per record: each record's answer tokens summed
    assert full.item() == pytest.approx(expected.item(), rel=1e-5)


def test_adapter_saved_from_the_top_window_loads_into_the_whole_model(tiny_model, tmp_path):
    from peft import PeftModel

    from evals.models import load_model

    peft_model, tokenizer = peft_tiny(tiny_model)
    ids, _, mask = load_split(write_split(tmp_path, 3, seed=4), tokenizer, 128)
    window = LayerWindow(causal_lm(peft_model), 1)
    window.top()
    with window.full_stack():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        peft_model.save_pretrained(tmp_path / "adapter")
    assert len(causal_lm(peft_model).get_decoder().layers) == 1  # back to the window after saving
    base, _ = load_model(tiny_model, "/nonexistent")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    # float32's bound on the forward's sums (~2e-4 of the logits' scale), whatever order they run in;
    # an adapter lost or loaded into the wrong layer moves the logits by a third of their largest
    sums = float32_sums(tiny_model, tokens=ids.shape[1], records=len(ids), backward=False)
    assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected,
                          rtol=0, atol=sums * EPS32 * expected.abs().max().item())


def rdp_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """Sampled-Gaussian RDP at integer orders (Mironov, Talwar, Zhang 2019, binomial expansion),
    converted with Balle et al. 2020: written here from the papers, not taken from Opacus."""
    best = math.inf
    for alpha in range(2, 256):
        terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                 + k * math.log(rate) + (alpha - k) * math.log1p(-rate) + (k * k - k) / (2 * noise ** 2)
                 for k in range(alpha + 1)]
        top = max(terms)
        rdp = steps * (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


def train_run(tiny_model: str, tmp_path: Path, *, profile: ProfileConfig | None = None, **training) -> TrainRun:
    """A run of the tiny model on 64 records (val 8); `training` overrides the settings' training block."""
    base = {"epochs": 2, "max_steps": None, "batch_size": 16, "learning_rate": 1e-3, "lr_schedule": "constant",
            "max_seq_len": 128, "checkpoint_every": 4, "microbatch_size": 16, "cache_frozen_layers": True,
            "matmul_dtype": "float32", "public_warmup": {"steps": 0},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "top_layers": 1, "freeze_a": True},
            "privacy": PRIVACY.model_dump()}
    settings = Settings.model_validate({"data_dir": str(tmp_path), "training": {**base, **training}})
    return TrainRun(model=tiny_model, settings=settings, train_path=write_split(tmp_path, 64, seed=5),
                    val_path=write_split(tmp_path, 8, seed=6), seed=0, profile=profile)


def test_dp_lora_on_two_workers_spends_what_an_independent_accountant_says(tiny_model, tmp_path, ray_session):
    # 3 epochs of 4 batches, capped at 6 steps: the noise is solved for the 6 steps actually taken
    # with the public warm-up first (train/public.py): it must not touch the accounting
    warmup = {"steps": 2, "batch_size": 4, "min_records": 5, "sources": ["sgd"], "max_public_examples": 20}
    # bf16 products (autocast): clipping and accounting are the same whatever the precision
    # A as the warm-up left it, only B trained privately (train_run's freeze_a)
    run = train_run(tiny_model, tmp_path, epochs=3, max_steps=6, public_warmup=warmup, matmul_dtype="bfloat16")
    result = train_lora(run, num_workers=2, use_gpu=False, storage_path=tmp_path / "ray",
                        name="dp-2")
    m = result["metrics"]
    assert m["workers"] == 2 and m["accountant"] == "rdp" and m["cached_layers"] == 1
    assert m["clipping"] == "in_layer"  # B alone trains: its records' gradients come from its own backward
    assert m["matmul_dtype"] == "bfloat16"
    assert m["public_steps"] == 2 and m["public_examples"] > 0
    peft_model, _ = peft_tiny(tiny_model)
    b_numbers = sum(p.numel() for name, p in peft_model.named_parameters() if ".lora_B." in name)
    assert m["trainable_parameters"] == b_numbers
    assert m["step"] == m["total_steps"] == 6
    assert m["sample_rate"] == pytest.approx(16 / 64) and m["noise_multiplier"] > 0.3
    assert m["val_loss"] is not None and math.isfinite(m["val_loss"])
    independent = rdp_epsilon(m["noise_multiplier"], m["sample_rate"], m["step"], m["delta"])
    # Opacus takes the best of its orders (tenths below 11), this the best integer order: near
    # epsilon 8 the best is ~3, and the two differ by under 1% (double precision: any machine)
    assert m["epsilon"] == pytest.approx(independent, rel=0.02)
    assert 8.0 - 0.02 <= m["epsilon"] <= 8.0 + 1e-6  # the whole target spent by the last step, no more
    assert (Path(result["checkpoint"]) / "adapter_model.safetensors").exists()


def test_non_private_lora_trains_both_matrices_even_with_freeze_a(tiny_model, tmp_path, ray_session):
    # freeze_a is DP's tool (less noise); the non-private baseline DP is judged against trains LoRA whole
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "top_layers": 1, "freeze_a": True}
    run = train_run(tiny_model, tmp_path, max_steps=2, lora=lora, privacy={"enabled": False})
    result = train_lora(run, num_workers=1, use_gpu=False, storage_path=tmp_path / "ray",
                        name="plain")
    peft_model, _ = peft_tiny(tiny_model)
    lora_numbers = sum(p.numel() for name, p in peft_model.named_parameters() if ".lora_" in name)
    assert result["metrics"]["trainable_parameters"] == lora_numbers
    assert result["metrics"]["epsilon"] is None


def registered_checkpoints(storage: Path) -> int:
    """How many reported checkpoints Ray Train's controller has taken in. It collects them when it
    polls the workers, some time after they are on disk, and records them in its snapshot, which the
    run's second start resumes from: waiting for the snapshot, not for a guessed time, keeps the
    kill after them on a machine of any speed."""
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):  # written in place: a read may catch it halfway
            return 0
    return 0


def run_and_kill_a_worker(config_path: Path, out: Path, storage: Path) -> list[int]:
    """Start the run in its own Ray, SIGKILL its Train worker after two checkpoints; the pids killed."""
    import subprocess
    import sys

    import psutil

    run = subprocess.Popen([sys.executable, "-m", "tests.resume_run", str(config_path), str(out)],
                           cwd=Path(__file__).parent.parent)
    killed = []
    try:
        deadline = time.time() + 200
        while time.time() < deadline and registered_checkpoints(storage) < 2 and run.poll() is None:
            time.sleep(0.05)
        for proc in psutil.Process(run.pid).children(recursive=True):  # this run's own Ray processes only
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
        assert run.wait(timeout=300) == 0
    finally:
        if run.poll() is None:
            for proc in psutil.Process(run.pid).children(recursive=True):
                proc.kill()
            run.kill()
    return killed


def test_a_killed_worker_resumes_from_its_last_checkpoint(tiny_model, tmp_path):
    epochs, steps_per_epoch = 12, 64 // 4
    run = train_run(tiny_model, tmp_path, epochs=epochs, batch_size=4, checkpoint_every=10)
    (tmp_path / "config.json").write_text(run.model_dump_json())
    killed = run_and_kill_a_worker(tmp_path / "config.json", tmp_path / "metrics.json", tmp_path / "ray")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert killed, "no train worker was found to kill"
    # the second start of the run picked up the last checkpoint (every 10 steps and at every epoch's end)
    assert m["resumed_from"] is not None and 0 < m["resumed_from"] < m["step"]
    assert m["resumed_from"] % 10 == 0 or m["resumed_from"] % steps_per_epoch == 0
    assert m["step"] == m["total_steps"] == epochs * steps_per_epoch
    # the accountant's history came back with the checkpoint: epsilon is the whole run's
    assert m["epsilon"] == pytest.approx(rdp_epsilon(m["noise_multiplier"], m["sample_rate"], m["step"],
                                                     m["delta"]), rel=0.02)


def test_only_a_lost_worker_starts_the_run_again():
    import ray.exceptions
    from ray.train import WorkerGroupError

    from train.jobstate import worker_died

    assert worker_died(WorkerGroupError("killed", {0: ray.exceptions.ActorDiedError()}))
    # the loop's own errors (a diverged loss, a refusal) end the run: repeating them changes nothing
    assert not worker_died(WorkerGroupError("raised", {0: ValueError("loss is nan")}))
    assert not worker_died(WorkerGroupError("mixed", {0: ray.exceptions.ActorDiedError(), 1: ValueError()}))
    assert not worker_died(RuntimeError("no workers named"))


def test_an_epsilon_the_data_cannot_carry_is_refused_with_the_noise_it_needs():
    noise = dp.refuse_hopeless(PRIVACY, num_examples=200, batch_size=64, epochs=10, max_steps=None)
    assert 0.3 < noise < 10
    # fewer steps for the same epsilon: less noise on each
    assert dp.refuse_hopeless(PRIVACY, num_examples=200, batch_size=64, epochs=10, max_steps=12) < 0.8 * noise
    for epsilon in (0.2, 0.05):  # 0.05 is past the default RDP orders: solved again with higher ones
        with pytest.raises(dp.PrivacyUnattainable) as refused:
            dp.refuse_hopeless(PRIVACY.model_copy(update={"target_epsilon": epsilon}), num_examples=200,
                               batch_size=8, epochs=2, max_steps=None)
        needed = float(re.search(r"needs noise_multiplier (\d+\.\d\d) for 200 examples", str(refused.value))[1])
        assert needed / 8 > 0.5  # above max_noise_ratio: that is why it was refused
        assert rdp_epsilon(needed, 8 / 200, 50, 1e-5) == pytest.approx(epsilon, abs=0.012)  # Opacus solves to 0.01


def test_a_layer_opacus_cannot_clip_is_named(tiny_model):
    from evals.models import load_model

    model, _ = load_model(tiny_model, "/nonexistent")
    model.model.extra_norm = torch.nn.BatchNorm1d(4)
    with pytest.raises(dp.ModelNotPrivatizable, match="BatchNorm"):
        dp.check_module(model)
    del model.model.extra_norm
    dp.check_module(model)  # the plain Llama passes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_dp_lora_trains_on_the_gpu(tiny_model, tmp_path, ray_session):
    # the GPU path: the worker's device is CUDA (bf16 autocast, NCCL process group), DP as on CPU
    result = train_lora(train_run(tiny_model, tmp_path, max_steps=4), num_workers=1, use_gpu=True,
                        storage_path=tmp_path / "ray", name="dp-gpu")
    m = result["metrics"]
    assert m["device"] == "cuda" and m["accountant"] == "rdp" and m["step"] == m["total_steps"] == 4
    assert m["clipping"] == "in_layer"
    assert math.isfinite(m["loss"]) and m["val_loss"] is not None and math.isfinite(m["val_loss"])
    independent = rdp_epsilon(m["noise_multiplier"], m["sample_rate"], m["step"], m["delta"])
    assert m["epsilon"] == pytest.approx(independent, rel=0.02)
    assert (Path(result["checkpoint"]) / "adapter_model.safetensors").exists()
