"""LoRA fine-tuning on the production answers, run by Ray Train's TorchTrainer.

The loop reads top to bottom, in three parts, from one typed `TrainRun` (train/run_config.py):
`_prepare` loads the base model, wraps it in LoRA (warmed up on public examples first when
private: train/public.py), tokenizes the splits (loss only on the answer tokens) and caches the
frozen bottom's activations (train/tail.py); `_wrap` makes it differentially private (train/dp.py)
or plain data-parallel; `_steps` runs the steps. Every step checks for cancellation and for a
non-finite loss (one-line reason, no retries: a diverged run does not get better by repeating).
Checkpoints carry the adapter (a few MB) plus the optimizer and accountant state and go out
through `ray.train.report`, so the driver gets them back whatever node the worker ran on, and a
run whose worker died is started again from the last one (`training.max_failures`, see `train_lora`).
"""
from __future__ import annotations

import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evals.models import load_model
from evals.precision import training_autocast
from ray_app.config import LoraConfig, PrivacyConfig, TrainingConfig
from ray_app.errors import FlywheelError, JobFailed
from train import dp
from train.data import load_split
from train.dp import Wrapped
from train.run_config import TrainRun
from train.step_profile import StepProfiler
from train.steps import GPU_DP_SPREAD, cycle, forward_backward, learning_rate_at, row_slices
from train.tail import AnswerLoss, LayerWindow, cache_bytes, causal_lm


class TrainingDiverged(JobFailed):
    reason = "training_diverged"


MAX_CACHE_BYTES = 4 << 30  # above this the frozen bottom runs every step instead of being cached


@dataclass
class Prepared:
    """A worker's model and data, ready to wrap: the loop's first part (`_prepare`)."""

    peft_model: Any
    window: LayerWindow | None  # the cached frozen bottom, if any
    inputs: dict[str, torch.Tensor]  # per split: token ids, or the cached hidden states
    splits: dict[str, tuple[torch.Tensor, ...]]  # per split: (ids, labels, mask)
    device: torch.device
    autocast: Any
    rank: int
    world: int
    warmed: dict[str, Any]  # what the public warm-up did


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry in each worker; `config` is a `TrainRun` as JSON (`TrainRun.loop_config`)."""
    fit_in_worker(TrainRun.model_validate(config))  # the one validation: nothing below reads a key by string


def fit_in_worker(run: TrainRun) -> None:
    """The loop in one worker: prepare the model and data, wrap them (private or not), step."""
    torch.manual_seed(run.seed)
    torch.set_num_threads(run.cpus_per_worker)
    ready = _prepare(run)
    _steps(run, ready, _wrap(run, ready))


def _prepare(run: TrainRun) -> Prepared:
    """Base model -> LoRA (warmed up on public examples first when private) -> tokenized splits,
    the frozen bottom's activations cached where LoRA sits on the top layers only."""
    import ray.train
    from peft import get_peft_model

    from train.public import public_warm_up

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    training = run.training
    model, tokenizer = load_model(run.model, run.settings.data_dir)
    if run.private:
        dp.check_module(model)  # layers Opacus cannot clip per example are named before any work
    peft_model = get_peft_model(model, lora_config(model, training.lora))
    peft_model.to(device)
    autocast = training_autocast(device.type, training.matmul_dtype)  # bf16 products where native
    warmed = public_warm_up(run, peft_model, tokenizer, device, autocast=autocast,
                            resuming=ray.train.get_checkpoint() is not None)
    if run.private and training.lora.freeze_a:  # non-private LoRA trains both, as usual
        dp.freeze_lora_a(peft_model)
    splits = {"train": load_split(run.train_path, tokenizer, training.max_seq_len)}
    if run.val_path is not None:
        splits["val"] = load_split(run.val_path, tokenizer, training.max_seq_len)
    window = _window(peft_model, training, splits["train"])
    with autocast:
        inputs = {name: _inputs(window, ids, mask, device, rank, world) for name, (ids, _, mask) in splits.items()}
    return Prepared(peft_model, window, inputs, splits, device, autocast, rank, world, warmed)


def _wrap(run: TrainRun, ready: Prepared) -> Wrapped:
    """The loss module, optimizer and loader: made differentially private (Opacus), or plain DDP."""
    import ray.train

    training = run.training
    _, labels, mask = ready.splits["train"]
    data = torch.utils.data.TensorDataset(ready.inputs["train"], labels.to(ready.device), mask.to(ready.device))
    module = AnswerLoss(ready.peft_model)
    # DP: the global expected batch (each worker Poisson-samples its shard's share); plain DDP: a share each.
    per_loader = training.batch_size if run.private else max(1, training.batch_size // ready.world)
    loader = torch.utils.data.DataLoader(data, batch_size=per_loader, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=training.learning_rate,
                                  weight_decay=0.0)
    if not run.private:
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        return Wrapped(ray.train.torch.prepare_model(module, move_to_device=False), optimizer, loader, None, None, None)
    noise = dp.refuse_hopeless(training.privacy, num_examples=len(data), batch_size=training.batch_size,
                               epochs=training.epochs, max_steps=training.max_steps)
    return dp.make_private(module, optimizer, loader, privacy=training.privacy, noise_multiplier=noise,
                           distributed=ready.world > 1)


def _steps(run: TrainRun, ready: Prepared, wrapped: Wrapped) -> None:
    """The steps, from the last checkpoint if the run was restarted; reports every checkpoint_every
    steps and at each epoch's end (with the val loss Tune's ASHA compares)."""
    import ray.train

    from train.jobstate import CancelProbe

    training, (module, optimizer, loader, engine, criterion, clipping) = run.training, wrapped
    steps_per_epoch = max(1, len(loader))
    total_steps = min(training.epochs * steps_per_epoch, training.max_steps or math.inf)  # DP's noise is for these
    state = {"step": 0, "losses": [], "val_loss": None, "resumed_from": None, "seconds": 0.0, "step_seconds": [],
             "passes": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _restore(Path(folder), ready.peft_model, optimizer, engine, state)
    info = _run_info(ready, engine, clipping, total_steps)
    probe = CancelProbe.for_job(run.settings, run.job_id)
    module.train()
    expected_rows = -(-training.batch_size // ready.world)  # a worker's expected batch, DP or not
    spread = GPU_DP_SPREAD if engine is not None and ready.device.type == "cuda" else 0.0  # fewer passes
    batches = cycle(loader)
    profiler = StepProfiler(run.profile, device_type=ready.device.type, rank=ready.rank)  # off unless asked
    started = time.time() - state["seconds"]
    while state["step"] < total_steps:
        probe.check()
        ids, labels, mask = next(batches)
        tick = time.perf_counter()
        optimizer.zero_grad()
        for group in optimizer.param_groups:  # resume-safe: a function of the step alone
            group["lr"] = learning_rate_at(training, state["step"], total_steps)
        if len(ids):  # Poisson sampling may draw an empty batch: then the step is noise alone
            passes = row_slices(len(ids), expected=expected_rows, microbatch=training.microbatch_size, spread=spread)
            loss = forward_backward(module, optimizer, criterion, ids, labels, mask, passes,
                                    private=engine is not None, autocast=ready.autocast)
            state["passes"] += len(passes)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training loss became {loss} at step {state['step']}; "
                                       f"lower training.learning_rate (now {training.learning_rate})")
            state["losses"].append(loss)
        elif engine is not None:
            dp.noise_only_grads(optimizer)
        optimizer.step()
        state["step_seconds"].append(time.perf_counter() - tick)
        state["step"] += 1
        profiler.step()
        epoch_end = state["step"] % steps_per_epoch == 0 or state["step"] == total_steps
        if epoch_end and "val" in ready.inputs:
            state["val_loss"] = _val_loss(_unwrap(module), ready.inputs["val"], ready.splits["val"], ready.device)
        if epoch_end or state["step"] % training.checkpoint_every == 0:
            state["seconds"] = time.time() - started
            _report(ready.peft_model, ready.window, optimizer, engine, state, info, training.privacy,
                    steps_per_epoch, epoch_end=epoch_end, final=state["step"] == total_steps)


def _run_info(ready: Prepared, engine: Any, clipping: str | None, total_steps: float) -> dict[str, Any]:
    """What every report carries about the run as a whole."""
    return {"workers": ready.world, "device": str(ready.device.type), "accountant": "rdp" if engine else None,
            "clipping": clipping, "cached_layers": ready.window.start if ready.window else 0,
            "total_steps": total_steps,
            "trainable_parameters": sum(p.numel() for p in ready.peft_model.parameters() if p.requires_grad),
            "matmul_dtype": "bfloat16" if isinstance(ready.autocast, torch.autocast) else "float32", **ready.warmed}


def _window(peft_model: Any, training: TrainingConfig, train: tuple[torch.Tensor, ...]) -> LayerWindow | None:
    """The cached-bottom window when LoRA sits on the top layers only and the cache fits."""
    top = training.lora.top_layers
    if not top or not training.cache_frozen_layers:
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
            info: dict[str, Any], privacy: PrivacyConfig, steps_per_epoch: int, *, epoch_end: bool,
            final: bool) -> None:
    import ray.train

    timed = state["step_seconds"][1:] or state["step_seconds"]  # the first step pays for warm-up
    recent = state["losses"][-10:]
    metrics = {"step": state["step"], "epoch": (state["step"] - 1) // steps_per_epoch,
               "loss": sum(recent) / max(1, len(recent)), "first_loss": state["losses"][0] if state["losses"] else None,
               "val_loss": state["val_loss"], "seconds": state["seconds"],
               "step_seconds": sum(timed) / max(1, len(timed)),
               "passes_per_step": state["passes"] / max(1, state["step"]),  # forward + backward passes
               "peak_memory_mb": _peak_memory_mb(next(peft_model.parameters()).device),
               "resumed_from": state["resumed_from"], "epoch_end": epoch_end, "final": final, **info,
               **dp.privacy_spent(engine, privacy)}
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


def lora_config(model: Any, lora: LoraConfig) -> Any:
    """PEFT's LoraConfig from ours: the projections the model has, on its last `top_layers` layers."""
    import peft

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = lora.target_modules or [n for n in PROJECTIONS if n in names]
    if not targets:
        raise FlywheelError(f"none of {PROJECTIONS} found in the model; set training.lora.target_modules")
    layers = model.config.num_hidden_layers
    top = lora.top_layers
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           layers_to_transform=list(range(max(0, layers - top), layers)) if top else None,
                           task_type="CAUSAL_LM")


def train_lora(run: TrainRun, *, num_workers: int, use_gpu: bool, storage_path: Path, name: str,
               max_failures: int = 0) -> dict[str, Any]:
    """Fit with Ray Train on `num_workers` workers of `run.cpus_per_worker` CPUs each; return the
    final metrics and the adapter checkpoint's path.

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
            train_loop_config=run.loop_config(),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": run.cpus_per_worker}),
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

