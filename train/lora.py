"""LoRA fine-tuning on the production answers, run by Ray Train's TorchTrainer.

The loop reads top to bottom: load the base model, wrap it in LoRA (warmed up on public
examples first when private: train/public.py), tokenize the splits (loss only on the answer
tokens), cache the frozen bottom's activations (train/tail.py), make it differentially private
(train/dp.py) or plain data-parallel, then steps. Every step checks for cancellation and for a
non-finite loss (one-line reason, no retries: a diverged run does not get better by repeating).
Checkpoints carry the adapter (a few MB) plus the optimizer and accountant state and go out
through `ray.train.report`, so the driver gets them back whatever node the worker ran on, and a
run whose worker died is started again from the last one (`training.max_failures`, see `train_lora`).
"""
from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evals.models import load_model
from evals.precision import training_autocast
from ray_app.config import Settings
from ray_app.errors import FlywheelError, JobFailed
from train.data import load_split
from train.step_profile import StepProfiler
from train.steps import GPU_DP_SPREAD, cycle, forward_backward, learning_rate_at, row_slices
from train.tail import AnswerLoss, LayerWindow, cache_bytes, causal_lm


class TrainingDiverged(JobFailed):
    reason = "training_diverged"


MAX_CACHE_BYTES = 4 << 30  # above this the frozen bottom runs every step instead of being cached


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker. `config` is plain data (see `train_lora` for the keys)."""
    import ray.train
    from peft import get_peft_model

    from train import dp
    from train.jobstate import CancelProbe
    from train.public import public_warm_up

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["cpus_per_worker"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    probe = CancelProbe.from_config(config)
    privacy = config["privacy"]

    model, tokenizer = load_model(config["model"], config["data_dir"])
    if privacy["enabled"]:
        dp.check_module(model)  # layers Opacus cannot clip per example are named before any work
    peft_model = get_peft_model(model, lora_config(model, config["lora"]))
    peft_model.to(device)
    autocast = training_autocast(device.type, config["matmul_dtype"])  # bf16 products where native
    warmed = public_warm_up(config, peft_model, tokenizer, device, autocast=autocast,
                            resuming=ray.train.get_checkpoint() is not None)
    if privacy["enabled"] and config["lora"].get("freeze_a"):  # non-private LoRA trains both, as usual
        dp.freeze_lora_a(peft_model)
    splits = {"train": load_split(config["train_path"], tokenizer, config["max_seq_len"])}
    if config.get("val_path"):
        splits["val"] = load_split(config["val_path"], tokenizer, config["max_seq_len"])
    window = _window(peft_model, config, splits["train"])
    with autocast:
        inputs = {name: _inputs(window, ids, mask, device, rank, world) for name, (ids, _, mask) in splits.items()}
    data = torch.utils.data.TensorDataset(inputs["train"], *(t.to(device) for t in splits["train"][1:]))
    module = AnswerLoss(peft_model)
    # DP: the global expected batch (each worker Poisson-samples its shard's share); plain DDP: a share each.
    per_loader = config["batch_size"] if privacy["enabled"] else max(1, config["batch_size"] // world)
    loader = torch.utils.data.DataLoader(data, batch_size=per_loader, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config["learning_rate"],
                                  weight_decay=0.0)
    if privacy["enabled"]:
        noise = dp.refuse_hopeless(privacy, num_examples=len(data), batch_size=config["batch_size"],
                                   epochs=config["epochs"], max_steps=config["max_steps"])
        module, optimizer, loader, engine, criterion, clipping = dp.make_private(
            module, optimizer, loader, privacy=privacy, noise_multiplier=noise, distributed=world > 1)
    else:
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        module, engine = ray.train.torch.prepare_model(module, move_to_device=False), None
        criterion, clipping = None, None

    steps_per_epoch = max(1, len(loader))
    total_steps = min(config["epochs"] * steps_per_epoch, config["max_steps"] or math.inf)  # DP's noise is for these
    state = {"step": 0, "losses": [], "val_loss": None, "resumed_from": None, "seconds": 0.0, "step_seconds": [],
             "passes": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _restore(Path(folder), peft_model, optimizer, engine, state)
    info = {"workers": world, "device": str(device.type), "accountant": "rdp" if engine else None,
            "clipping": clipping, "cached_layers": window.start if window else 0, "total_steps": total_steps,
            "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
            "matmul_dtype": "bfloat16" if isinstance(autocast, torch.autocast) else "float32", **warmed}

    module.train()
    expected_rows = -(-config["batch_size"] // world)  # a worker's expected batch, DP or not
    spread = GPU_DP_SPREAD if privacy["enabled"] and device.type == "cuda" else 0.0  # fewer passes, Poisson batches
    batches = cycle(loader)
    profiler = StepProfiler(config, device_type=device.type, rank=rank)  # off unless config["profile_dir"]
    started = time.time() - state["seconds"]
    while state["step"] < total_steps:
        probe.check()
        ids, labels, mask = next(batches)
        tick = time.perf_counter()
        optimizer.zero_grad()
        for group in optimizer.param_groups:  # resume-safe: a function of the step alone
            group["lr"] = learning_rate_at(config, state["step"], total_steps)
        if len(ids):  # Poisson sampling may draw an empty batch: then the step is noise alone
            passes = row_slices(len(ids), expected=expected_rows, microbatch=config["microbatch_size"], spread=spread)
            loss = forward_backward(module, optimizer, criterion, ids, labels, mask, passes,
                                    private=engine is not None, autocast=autocast)
            state["passes"] += len(passes)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training loss became {loss} at step {state['step']}; "
                                       f"lower training.learning_rate (now {config['learning_rate']})")
            state["losses"].append(loss)
        elif engine is not None:
            dp.noise_only_grads(optimizer)
        optimizer.step()
        state["step_seconds"].append(time.perf_counter() - tick)
        state["step"] += 1
        profiler.step()
        epoch_end = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
        if epoch_end and "val" in inputs:
            state["val_loss"] = _val_loss(_unwrap(module), inputs["val"], splits["val"], device)
        if epoch_end or state["step"] % config["checkpoint_every"] == 0:
            state["seconds"] = time.time() - started
            _report(peft_model, window, optimizer, engine, state, info, privacy, steps_per_epoch,
                    epoch_end=epoch_end, final=state["step"] == total_steps)


def _window(peft_model: Any, config: dict[str, Any], train: tuple[torch.Tensor, ...]) -> LayerWindow | None:
    """The cached-bottom window when LoRA sits on the top layers only and the cache fits."""
    top = config["lora"].get("top_layers")
    if not top or not config.get("cache_frozen_layers", True):
        return None
    lm = causal_lm(peft_model)
    window = LayerWindow(lm, top)
    rows, length = train[0].shape
    if window.start == 0 or cache_bytes(rows, length, lm.config.hidden_size) > MAX_CACHE_BYTES:
        return None
    return window


def _inputs(window: LayerWindow | None, ids: torch.Tensor, mask: torch.Tensor, device: torch.device,
            rank: int, world: int) -> torch.Tensor:
    """Token ids, or the cached hidden states: each worker computes its share, then all gather them."""
    if window is None:
        return ids.to(device)
    part = window.cache(ids[rank::world].to(device), mask[rank::world].to(device))
    window.top()
    if world == 1:
        return part
    rows = -(-len(ids) // world)
    padded = torch.zeros((rows, *part.shape[1:]), dtype=part.dtype, device=device)
    padded[:len(part)] = part
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    full = torch.empty((len(ids), *part.shape[1:]), dtype=part.dtype, device=device)
    for r in range(world):
        full[r::world] = gathered[r][:len(range(r, len(ids), world))]
    return full


@torch.no_grad()
def _val_loss(module: AnswerLoss, inputs: torch.Tensor, split: tuple[torch.Tensor, ...], device: torch.device) -> float:
    """Answer-token loss on the val split (what Tune's ASHA compares trials on)."""
    module.eval()
    total = 0.0
    for rows in (slice(i, i + 16) for i in range(0, len(inputs), 16)):
        losses = module(inputs[rows], split[1][rows].to(device), split[2][rows].to(device))
        total += losses.mean().item() * len(inputs[rows])  # per record under ghost clipping, else the mean
    module.train()
    return total / len(inputs)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _report(peft_model: Any, window: LayerWindow | None, optimizer: Any, engine: Any, state: dict[str, Any],
            info: dict[str, Any], privacy: dict[str, Any], steps_per_epoch: int, *, epoch_end: bool,
            final: bool) -> None:
    import ray.train

    from train.dp import privacy_spent

    timed = state["step_seconds"][1:] or state["step_seconds"]  # the first step pays for warm-up
    recent = state["losses"][-10:]
    metrics = {"step": state["step"], "epoch": (state["step"] - 1) // steps_per_epoch,
               "loss": sum(recent) / max(1, len(recent)), "first_loss": state["losses"][0] if state["losses"] else None,
               "val_loss": state["val_loss"], "seconds": state["seconds"],
               "step_seconds": sum(timed) / max(1, len(timed)),
               "passes_per_step": state["passes"] / max(1, state["step"]),  # forward + backward passes
               "peak_memory_mb": _peak_memory_mb(next(peft_model.parameters()).device),
               "resumed_from": state["resumed_from"], "epoch_end": epoch_end, "final": final, **info,
               **privacy_spent(engine, privacy)}
    with tempfile.TemporaryDirectory() as tmp:
        if ray.train.get_context().get_world_rank() == 0:
            if window:
                with window.full_stack():  # saved under the layers' real indices: a plain adapter
                    peft_model.save_pretrained(tmp)
            else:
                peft_model.save_pretrained(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "state": state,
                        "accountant": list(engine.accountant.history) if engine else None}, Path(tmp) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(folder: Path, peft_model: Any, optimizer: Any, engine: Any, state: dict[str, Any]) -> None:
    """Resume after a worker failure: adapter, optimizer, accountant and counters from the checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")))
    saved = torch.load(folder / "state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    if engine is not None and saved["accountant"] is not None:
        engine.accountant.history = [tuple(h) for h in saved["accountant"]]
    state.update(saved["state"], resumed_from=saved["state"]["step"])


def _unwrap(model: Any) -> Any:
    while hasattr(model, "_module") or hasattr(model, "module"):  # Opacus GradSampleModule / DDP / DPDDP
        model = getattr(model, "_module", None) or model.module
    return model


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(model: Any, lora: dict[str, Any]) -> Any:
    """PEFT's LoraConfig from ours: the projections the model has, on its last `top_layers` layers."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = lora["target_modules"] or [n for n in PROJECTIONS if n in names]
    if not targets:
        raise FlywheelError(f"none of {PROJECTIONS} found in the model; set training.lora.target_modules")
    layers = model.config.num_hidden_layers
    top = lora.get("top_layers")
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
                      layers_to_transform=list(range(max(0, layers - top), layers)) if top else None,
                      task_type="CAUSAL_LM")


def train_config(settings: Settings, *, model: str, split_dir: Path, job_id: str, seed: int) -> dict[str, Any]:
    """What `train_loop_per_worker` reads: the job's training settings and its split files (the val
    split only when it has examples), plus the CancelProbe keys."""
    training = settings.training
    val = split_dir / "val.json"
    keys = {"epochs", "max_steps", "batch_size", "learning_rate", "lr_schedule", "max_seq_len", "microbatch_size",
            "checkpoint_every", "cache_frozen_layers", "matmul_dtype", "lora", "privacy", "public_warmup"}
    config = {"model": model, "data_dir": str(settings.data_dir), "train_path": str(split_dir / "train.json"),
              "val_path": str(val) if val.exists() and json.loads(val.read_text()) else None,
              **training.model_dump(include=keys), "seed": seed, "settings": settings.model_dump(mode="json"),
              "job_id": job_id}
    # no request the job scores on reaches the public warm-up, whichever public data it came from
    config["public_warmup"]["exclude_paths"] = [str(split_dir / "eval.json"), str(val)]
    return config


def train_lora(config: dict[str, Any], *, num_workers: int, use_gpu: bool, cpus_per_worker: int,
               storage_path: Path, name: str, max_failures: int = 0) -> dict[str, Any]:
    """Fit with Ray Train; return the final metrics and the adapter checkpoint's path.

    `config` keys: model, data_dir, train_path, val_path (optional), epochs, max_steps, batch_size,
    microbatch_size, learning_rate, lr_schedule, max_seq_len, checkpoint_every, seed, cache_frozen_layers,
    lora{r, alpha, dropout, target_modules, top_layers}, privacy{...}, public_warmup{...} (train/public.py), and
    the CancelProbe keys (settings, job_id).

    `max_failures`: how many times a run whose worker died is started again. Each new start is a
    fresh Ray Train controller on the same run folder, which loads the run's checkpoint snapshot,
    so the loop resumes from the last reported checkpoint (Ray Train V2's driver-level restore).
    Ray's own in-place restart (FailureConfig.max_failures) is not used: in Ray 2.60 the restarted
    worker group here usually blocked in `ray.train.report`. Errors raised by the loop itself (a
    diverged loss, a refusal, a cancellation) are not retried: repeating them changes nothing.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    for attempt in range(max_failures + 1):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**config, "cpus_per_worker": cpus_per_worker},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage_path),
                                 failure_config=FailureConfig(max_failures=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        try:
            result = trainer.fit()
            break
        except TrainingFailedError as exc:
            from train.jobstate import one_line_reason, worker_died

            if attempt < max_failures and worker_died(exc):
                continue
            raise JobFailed(f"training failed: {one_line_reason(exc)}") from exc
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path}

