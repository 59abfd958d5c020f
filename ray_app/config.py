"""Settings: one pydantic model, loaded once at the entry point and passed down.

Sources, lowest to highest precedence: the defaults below, the YAML file named by
`FLYWHEEL_CONFIG` (or `--config`), then the `FLYWHEEL_*` environment variables that
name stores and keys. Nothing else in the code reads the environment.

The `data_split` names are the NVIDIA blueprint's; the ACGS seed's names
(`eval_dataset_size`, `validation_ratio`, `min_records_for_evaluation`) are accepted
as aliases so settings from either world carry over.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from ray_app.errors import ConfigError
from ray_app.routes import GatewayConfig

CONSTITUTIONAL_HASH = "cdd01ef066bc6cf2"

# Where products run in bfloat16 (evals/precision.py): "auto" = where the hardware multiplies it natively.
MatmulDtype = Literal["auto", "float32", "bfloat16"]
PublicSource = Literal["glaive", "sgd", "executable", "complexfuncbench"]


class StrictModel(BaseModel):
    """Unknown keys are an error that names the key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataSplitConfig(StrictModel):
    eval_size: int = Field(20, ge=1, validation_alias=AliasChoices("eval_size", "eval_dataset_size"))
    val_ratio: float = Field(0.1, gt=0.0, lt=1.0, validation_alias=AliasChoices("val_ratio", "validation_ratio"))
    min_total_records: int = Field(50, ge=1, validation_alias=AliasChoices("min_total_records",
                                                                          "min_records_for_evaluation"))
    limit: int = Field(10_000, ge=1)
    random_seed: int | None = None


class IclConfig(StrictModel):
    """In-context examples for the ICL evaluation (the NVIDIA blueprint's `icl_config` names)."""

    example_selection: Literal["uniform_distribution", "semantic_similarity"] = "semantic_similarity"
    max_examples: int = Field(3, ge=1)
    max_context_length: int = Field(160, ge=16)  # tokens the examples may take in the prompt


class CandidateConfig(StrictModel):
    model: str  # a packaged alias (see train/models), a Hugging Face id or a local folder
    name: str | None = None  # display name; defaults to `model`


class LoraConfig(StrictModel):
    # Rank 2 on q/v of the top 10 layers, A frozen: ~15k trainable numbers for SmolLM2. DP-SGD adds
    # noise to every trainable coordinate while a record's signal is bounded by the clip norm, so the
    # adapter is as thin as still learns the task. The ACGS trainer's r 16 on q/k/v/o is ~30x wider;
    # under epsilon 8 on ~200 records wide adapters stayed at 0 function-name accuracy here.
    r: int = Field(2, ge=1)
    alpha: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = ["q_proj", "v_proj"]  # None: attention and MLP projections found
    # LoRA on the last N transformer layers only: the frozen layers below run once (cached) and
    # backprop stops at layer L-N. None: every layer.
    top_layers: int | None = Field(10, ge=1)
    # DP runs train B only (FFA-LoRA, Sun et al. 2024): DP's noise spreads over fewer numbers while a record's
    # clipped signal keeps its bound (rank 2 B only 0.95 / 0.925 names / args, whole 0.90 / 0.75: docs/training.md).
    freeze_a: bool = True


class PrivacyConfig(StrictModel):
    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    # per (workload, client), per record (ray_app/privacy.py); default: three epsilon-8 runs a record; None: no cap
    budget_epsilon: float | None = Field(14.0, gt=0.0)
    # Refused up front when noise_multiplier / expected batch exceeds this: the noise would drown the
    # gradient (train/dp.py refuse_hopeless names the noise multiplier the epsilon would need).
    max_noise_ratio: float = Field(0.5, gt=0.0)
    # in_layer: per-record gradients in the LoRA B layers' backward (freeze_a; else hooks); hooks: Opacus' module
    # hooks; ghost: norms, then a second backward, no per-record gradient stored (docs/training.md).
    clipping: Literal["in_layer", "hooks", "ghost"] = "in_layer"


class PublicWarmupConfig(StrictModel):
    """Plain LoRA steps on public examples before DP training (train/public.py): public function-calling
    data and the service's shared tool definitions teach the answer without spending privacy."""

    steps: int = Field(40, ge=0)  # 0: off
    batch_size: int = Field(8, ge=1)
    min_records: int = Field(5, ge=1)  # training records that must carry a tool definition for it to be used
    sources: list[PublicSource] = ["glaive", "sgd", "executable", "complexfuncbench"]  # NESTFUL (public_data.py)
    max_public_examples: int = Field(800, ge=0)


class TrainingConfig(StrictModel):
    # DP-SGD's recipe for a few hundred records (tests/bench/bench_dp.py): batches of a few percent of the
    # data, a step budget, a high constant rate (Adam); smaller batches or more epochs did not help here.
    epochs: int = Field(8, ge=1)
    # A step budget (None: the epochs decide); DP's noise is solved for the steps actually taken, so at a
    # fixed epsilon records beyond it buy less noise, not more steps (docs/training.md has the figures).
    max_steps: int | None = Field(80, ge=1)
    batch_size: int = Field(32, ge=1)
    # Rows per forward/backward: a batch runs in slices of this size, their gradients summed, so memory
    # stays bounded whatever batch_size DP asks for. DP on a GPU: a Poisson batch's excess, up to 1.5
    # standard deviations of its size, joins the planned passes (12 rows at 8, 40 at 32; train/steps.py).
    microbatch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-2, gt=0.0)
    # constant, or linear decay to 5% of the rate by the last step. Under DP's noise constant scored
    # higher (SmolLM2, epsilon 8, same seeds: 0.65 / 0.79 constant, 0.58 / 0.67 linear).
    lr_schedule: Literal["constant", "linear"] = "constant"
    max_seq_len: int = Field(1024, ge=16)  # real requests' tool lists and histories run to ~900 tokens
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    checkpoint_every: int = Field(20, ge=1)
    # Fresh starts of a training run that lost a worker, each resuming from the last checkpoint
    # (train.lora.train_lora); errors raised by the training loop itself are never retried.
    max_failures: int = Field(1, ge=0)
    # Run the frozen layers below lora.top_layers once and train on their cached output (train/tail.py).
    cache_frozen_layers: bool = True
    # Products in bfloat16 under autocast: always on CUDA; on a CPU where bf16 multiplies natively
    # (AVX512-BF16, AMX) when "auto". float32 everywhere: "float32".
    matmul_dtype: MatmulDtype = "auto"
    lora: LoraConfig = LoraConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    public_warmup: PublicWarmupConfig = PublicWarmupConfig()


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0.0)  # the trial's one Ray Train worker; its torch threads = max(1, int(cpu))
    gpu: float = Field(0.0, ge=0.0, le=1.0)  # a fraction shares one GPU between trials; 0: CPU only


class SweepConfig(StrictModel):
    """A Ray Tune grid over model x LoRA rank x learning rate x DP (x noise), stopped early by ASHA.

    Each trial fine-tunes for up to `max_epochs`, reporting the answer-token loss on the job's val
    split after every epoch; ASHA stops the weak ones at its rungs (`grace_period` epochs, then
    x `reduction_factor`). Trials that finish are scored on the eval split and priced with their
    model's measured cost: the report's cost/accuracy frontier. `scheduler: fifo` runs the full grid.
    """

    enabled: bool = False
    models: list[str] | None = None  # None: every candidate; else a subset of the candidates' `model`s
    lora_r: list[int] = Field([1, 2], min_length=1)  # thin adapters: DP's noise grows with the width
    learning_rate: list[float] = Field([1e-2, 3e-2], min_length=1)
    dp: list[bool] = Field([True], min_length=1)  # False: the model_fine_tuning policy denies the trial
    target_epsilon: list[float] = Field([8.0], min_length=1)  # DP noise: the multiplier is solved per epsilon
    seeds: list[int] = Field([0], min_length=1)  # repeats of the grid
    scheduler: Literal["asha", "fifo"] = "asha"
    max_epochs: int = Field(8, ge=1)
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    trial_resources: TrialResources = TrialResources()

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"sweep.grace_period={self.grace_period} exceeds sweep.max_epochs={self.max_epochs}")
        for name in ("lora_r", "learning_rate", "target_epsilon"):
            bad = [v for v in getattr(self, name) if v <= 0]
            if bad:
                raise ValueError(f"sweep.{name} values must be > 0 (got {bad})")
        return self


class EvaluationConfig(StrictModel):
    """How candidates are scored: greedy decoding of the eval split (evals/)."""

    batch_size: int = Field(8, ge=1)  # prompts decoded at once (continuous batching: evals/decode.py)
    constrained: bool = True  # tool calls decoded under the request's own tools' schemas (evals/grammar.py)
    compare_free: bool = True  # ...and scored again decoding free, shown beside it
    # Linear layers in bfloat16 (evals/precision.py); auto: where the CPU multiplies it natively (~2x tokens/s)
    matmul_dtype: MatmulDtype = "auto"


class CostConfig(StrictModel):
    """The price model: measured throughput times the price of the hardware it ran on."""

    usd_per_cpu_hour: float = Field(0.05, ge=0.0)
    usd_per_gpu_hour: float = Field(2.50, ge=0.0)
    production_model: str = "production"
    production_usd_per_million_tokens: float = Field(10.0, ge=0.0)


class GovernanceConfig(StrictModel):
    constitutional_hash: str = CONSTITUTIONAL_HASH
    # Accuracy ratio a candidate must keep, per workload type (ACGS service configs).
    thresholds: dict[str, float] = {"constitutional_ai": 0.95, "policy_governance": 0.90, "tool_calling": 0.90,
                                    "generic": 0.90}
    min_compliance: float = Field(0.95, ge=0.0, le=1.0)
    audit_sample_rate: float = Field(0.1, ge=0.0, le=1.0)  # routine successes kept; violations always
    audit_retention_days: int = Field(2555, ge=1)  # the constitution asks for at least 7 years
    # A non-compliant production answer: dropped, or revised by the first candidate (ACGS cycle, train/revise.py)
    repair_noncompliant: bool = False
    max_revisions: int = Field(3, ge=1, le=10)


class JobsConfig(StrictModel):
    launch: bool = True  # start created jobs as Ray jobs; false: only store them (an outside runner picks them up)
    auto_trigger: bool = True  # create a job when a workload crosses min_records_for_evaluation
    auto_trigger_workloads: list[str] | None = None  # only these workload ids; None: every workload
    retrigger_every: int = Field(500, ge=1)  # ...and again after this many more records
    # A job driver's reservation (`ray job submit --entrypoint-*`): none (it orchestrates); a custom resource
    # such as {"flywheel_jobs": 1}, given to nodes at `ray start --resources`, caps and pins concurrent jobs.
    entrypoint_num_cpus: float = Field(0.0, ge=0.0)
    entrypoint_resources: dict[str, float] = {}


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_records: int = Field(5_000, ge=1)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    ingest_replicas: int = Field(2, ge=1)  # processes: JSON parsing is CPU-bound
    # Serve's Python proxy (Ray's default) or HAProxy before replicas serving HTTP themselves (cluster/README.md)
    ingress: Literal["proxy", "haproxy"] = "proxy"


class Settings(StrictModel):
    data_dir: Path = Path(".flywheel")
    log_store: str | None = None  # None: embedded; elasticsearch://HOST:PORT
    job_store: str | None = None  # None: embedded; mongodb://HOST:PORT/DB
    admin_key: str | None = None
    data_split: DataSplitConfig = DataSplitConfig()
    icl_config: IclConfig = IclConfig()
    candidates: list[CandidateConfig] = [CandidateConfig(model="smollm2-135m")]
    training: TrainingConfig = TrainingConfig()
    sweep: SweepConfig = SweepConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    cost: CostConfig = CostConfig()
    governance: GovernanceConfig = GovernanceConfig()
    jobs: JobsConfig = JobsConfig()
    serve: ServeConfig = ServeConfig()
    gateway: GatewayConfig = GatewayConfig()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Ray workers need not share the driver's working directory: pin the path down here.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.candidates:
            raise ValueError("candidates: at least one candidate model is needed")
        if self.training.lora.alpha < self.training.lora.r // 4:
            raise ValueError(f"training.lora.alpha={self.training.lora.alpha} is far below r={self.training.lora.r}")
        unknown = set(self.sweep.models or ()) - {c.model for c in self.candidates}
        if unknown:  # a sweep point is priced with its candidate's measured cost
            raise ValueError(f"sweep.models {sorted(unknown)} are not candidates")
        return self

    # The ACGS seed's names, read-only views of the blueprint's.
    @property
    def min_records_for_evaluation(self) -> int:
        return self.data_split.min_total_records

    def threshold_for(self, workload_type: str) -> float:
        return self.governance.thresholds.get(workload_type, self.governance.thresholds.get("generic", 0.9))

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> Settings:
        """A copy with a job's `config` merged in (deeply), validated again."""
        if not overrides:
            return self
        return _validate(_deep_merge(self.model_dump(mode="json", by_alias=False), dict(overrides)))


ENV_FIELDS = {"FLYWHEEL_DATA_DIR": "data_dir", "FLYWHEEL_LOG_STORE": "log_store", "FLYWHEEL_JOB_STORE": "job_store",
              "FLYWHEEL_ADMIN_KEY": "admin_key"}


def native_bf16_override(env: Mapping[str, str] | None = None) -> bool | None:
    """FLYWHEEL_NATIVE_BF16 "0"/"1" stands in for the CPU's bf16 flags (evals/precision.py), so one machine
    runs both paths (Ray's workers inherit it); unset: None, the CPU decides."""
    value = (os.environ if env is None else env).get("FLYWHEEL_NATIVE_BF16")
    if value not in (None, "0", "1"):
        raise ConfigError(f'FLYWHEEL_NATIVE_BF16 must be "0" or "1", got {value!r}')
    return None if value is None else value == "1"


def ray_cluster_named(env: Mapping[str, str] | None = None) -> bool:
    """RAY_ADDRESS names a cluster to join; unset or empty, ray_app/local_ray.py starts Flywheel's own."""
    return bool((os.environ if env is None else env).get("RAY_ADDRESS"))


def load_settings(config_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """The one place settings are read. `env` defaults to the process environment."""
    env = os.environ if env is None else env
    path = config_file or env.get("FLYWHEEL_CONFIG")
    data: dict[str, Any] = {}
    if path:
        data = _read_yaml(Path(path))
    for var, field in ENV_FIELDS.items():
        if env.get(var):
            data[field] = env[var]
    gateway = data.get("gateway") or {}
    if isinstance(gateway, dict):  # the upstream's key comes from the env var the settings name, never a file
        key = env.get(gateway.get("upstream_api_key_env") or GatewayConfig().upstream_api_key_env)
        data["gateway"] = {**gateway, **({"upstream_api_key": key} if key else {})}
    return _validate(data)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _validate(data: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: PydanticValidationError) -> str:
    """One line per problem, each naming the field path and quoting the bad value."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key")
        else:
            parts.append(f"{where}: {err['msg']} (got {err.get('input')!r:.80})")
    return "; ".join(parts)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out

