"""LoRA fine-tuning on the production answers, run by Ray Train's TorchTrainer.

The loop reads top to bottom: load the base model, wrap it in LoRA, tokenize the split
(loss only on the answer tokens), optionally make it differentially private (train/dp.py),
then steps. Each step checks for cancellation and for a non-finite loss (one-line reason,
no retries: a diverged run does not get better by repeating). Checkpoints carry only the
adapter (a few MB) and go out through `ray.train.report`, so the driver gets them back
from `result.checkpoint` whatever node the worker ran on.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evals.models import load_model
from evals.prompts import build_messages, render_prompt, target_of
from ray_app.errors import FlywheelError, JobFailed

IGNORE = -100


class TrainingDiverged(JobFailed):
    reason = "training_diverged"


def end_of_turn(tokenizer: Any) -> str:
    """What closes an assistant turn in the model's own template, so generation learns to stop."""
    return "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")


def tokenize_example(tokenizer: Any, example: dict[str, Any], max_seq_len: int) -> dict[str, list[int]]:
    """Prompt tokens (labels ignored) + answer tokens; the prompt is cut from the left to fit."""
    prompt = render_prompt(tokenizer, build_messages(example))
    answer = target_of(example["record"], example["workload_type"]) + end_of_turn(tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_seq_len // 2]
    p_ids = p_ids[-(max_seq_len - len(a_ids)):]
    return {"input_ids": p_ids + a_ids, "labels": [IGNORE] * len(p_ids) + a_ids}


def pad_dataset(rows: list[dict[str, list[int]]], pad_id: int) -> torch.utils.data.TensorDataset:
    """Fixed-length tensors (right-padded to the longest row): Opacus's Poisson sampler needs uniform shapes."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return torch.utils.data.TensorDataset(ids, labels, mask)


def answer_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's mean answer-token loss (per-example terms, as DP-SGD needs)."""
    width = int(mask.sum(dim=1).max().item())  # trim the padding every row shares: no FLOPs on it
    ids, labels, mask = ids[:, :width], labels[:, :width], mask[:, :width]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                                  reduction="none")
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counts).mean()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker. `config` is plain data (see `train_lora` for the keys)."""
    import ray.train
    from peft import get_peft_model

    from train.dp import make_private
    from train.jobstate import CancelProbe

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["cpus_per_worker"])
    probe = CancelProbe.from_config(config)
    model, tokenizer = load_model(config["model"], config["data_dir"])
    model = get_peft_model(model, lora_config(model, config["lora"]))
    examples = json.loads(Path(config["train_path"]).read_text())
    data = pad_dataset([tokenize_example(tokenizer, e, config["max_seq_len"]) for e in examples],
                       tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(data, batch_size=config["batch_size"], shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["learning_rate"])
    total_steps = config["epochs"] * max(1, len(loader))
    privacy = config["privacy"]
    if privacy["enabled"]:
        model, optimizer, loader, engine = make_private(model, optimizer, loader, privacy=privacy,
                                                        epochs=config["epochs"])
    else:
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=True)
        model, engine = ray.train.torch.prepare_model(model), None
    # Linear decay to 5%: few steps at a high rate, then settle (made after make_private wraps the optimizer).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.05, 1 - i / total_steps))
    model.train()
    started, step, losses = time.time(), 0, []
    for epoch in range(config["epochs"]):
        for ids, labels, mask in loader:
            probe.check()
            if len(ids) == 0:  # Poisson sampling may draw an empty batch; it still counts as a step
                optimizer.zero_grad()
                optimizer.step()
                step += 1
                continue
            loss = answer_loss(model, ids, labels, mask)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"training loss became {loss.item()} at step {step} (epoch {epoch}); "
                                       f"lower training.learning_rate (now {config['learning_rate']})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % config["checkpoint_every"] == 0:
                _report(model, step, epoch, losses, started, engine, privacy)
    _report(model, step, config["epochs"] - 1, losses, started, engine, privacy, final=True)


def _report(model: Any, step: int, epoch: int, losses: list[float], started: float, engine: Any,
            privacy: dict[str, Any], final: bool = False) -> None:
    import ray.train

    from train.dp import privacy_spent

    metrics = {"step": step, "epoch": epoch, "loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
               "first_loss": losses[0] if losses else None, "seconds": time.time() - started, "final": final,
               **privacy_spent(engine, privacy)}
    with tempfile.TemporaryDirectory() as tmp:
        if ray.train.get_context().get_world_rank() == 0:
            _unwrap(model).save_pretrained(tmp)  # adapter weights only
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _unwrap(model: Any) -> Any:
    while hasattr(model, "_module") or hasattr(model, "module"):  # Opacus GradSampleModule / DDP
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


def train_lora(config: dict[str, Any], *, num_workers: int, use_gpu: bool, cpus_per_worker: int,
               storage_path: Path, name: str) -> dict[str, Any]:
    """Fit with Ray Train; return the final metrics and the adapter checkpoint's path.

    `config` keys: model, data_dir, train_path, epochs, batch_size, learning_rate, max_seq_len,
    checkpoint_every, seed, lora{r, alpha, dropout, target_modules}, privacy{...}, and the
    CancelProbe keys (settings, job_id).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**config, "cpus_per_worker": cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage_path), failure_config=FailureConfig(max_failures=0)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        from train.jobstate import one_line_reason

        raise JobFailed(f"training failed: {one_line_reason(exc)}") from exc
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path}
