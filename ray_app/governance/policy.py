"""Rego policy evaluation with regorus, failing closed.

`PolicyEngine.load()` parses the packaged policies (or the files given) once; `decide(rule, input)`
evaluates `data.acgs.nemo.constitutional.<rule>`, which every rule defines as an object
{"allow", "reasons", "lane"}. Anything else - an evaluation error, a rule that is undefined, a
malformed result - is a DENY whose reason says what went wrong.

regorus engines are "unsendable" (pinned to the thread that created them, even clones), so each
thread builds its own engine from the parsed sources on first use (a few ms, once per thread).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import regorus
from pydantic import BaseModel

from ray_app.config import CONSTITUTIONAL_HASH
from ray_app.errors import ConfigError

PACKAGE = "data.acgs.nemo.constitutional"
POLICY_DIR = Path(__file__).parent / "policies"
RULES = ("content_validation", "model_inference", "model_fine_tuning", "promotion", "rollback")

# ACGS-1 Lite facts: compliance >= 0.95, DP epsilon <= 8 and delta <= 1e-5, audit kept 7 years.
DEFAULT_CONFIG: dict[str, Any] = {
    "min_compliance": 0.95,
    "max_epsilon": 8.0,
    "max_delta": 1e-5,
    "min_retention_days": 2555,
    "review_margin": 0.02,  # promotions this close to a threshold go to the slow lane
    # The semantic lane's scores (governance/semantic.py) at or above these deny content. 0.5 is the operating
    # point tuned on labelled sentences; raise one to trade that category's recall for fewer false positives.
    "semantic_thresholds": {"violence": 0.5, "weapons": 0.5, "self_harm": 0.5, "illegal": 0.5, "hate": 0.5,
                            "exfiltration": 0.5},
    "quotas": {"default": {"gpu_hours": 100, "max_gpus": 8, "memory_gb": 800}},
}


class Decision(BaseModel):
    allow: bool
    reasons: list[str] = []
    lane: Literal["fast", "slow"] | None = None
    rule: str
    constitutional_hash: str


class PolicyEngine:
    """Parsed policies plus their data; thread-safe (one regorus engine per thread)."""

    def __init__(self, sources: Sequence[tuple[str, str]], data: Mapping[str, Any], constitutional_hash: str):
        self.sources = list(sources)
        self.constitutional_hash = constitutional_hash
        self.data = {"acgs": {"config": {**data, "constitutional_hash": constitutional_hash}}}
        self._local = threading.local()
        self._engine()  # parse now, so a broken policy fails at load time, not on first request

    @classmethod
    def load(cls, paths: Sequence[str | Path] | None = None, *, constitutional_hash: str = CONSTITUTIONAL_HASH,
             config: Mapping[str, Any] | None = None) -> PolicyEngine:
        """Policies from `paths` (files or folders of *.rego; default: the packaged ones).

        `config` overrides DEFAULT_CONFIG keys (thresholds, limits, quotas). A policy that does not
        parse raises ConfigError naming the file and line.
        """
        files: list[Path] = []
        for p in [POLICY_DIR] if paths is None else [Path(p) for p in paths]:
            files.extend(sorted(p.glob("*.rego")) if p.is_dir() else [p])
        if not files:
            raise ConfigError(f"no .rego policy files found in {paths}")
        sources = []
        for f in files:
            try:
                sources.append((str(f), f.read_text(encoding="utf-8")))
            except OSError as exc:
                raise ConfigError(f"cannot read policy {f}: {exc}", field="policies") from exc
        unknown = set(config or {}) - set(DEFAULT_CONFIG)
        if unknown:
            raise ConfigError(f"unknown policy config key {min(unknown)!r}", field="policies")
        return cls(sources, {**DEFAULT_CONFIG, **(config or {})}, constitutional_hash)

    def _engine(self) -> regorus.Engine:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = regorus.Engine()
            for path, text in self.sources:
                try:
                    engine.add_policy(path, text)
                except RuntimeError as exc:
                    raise ConfigError(f"policy {_location(str(exc), path)} does not load: {_first_error(exc)}",
                                      field="policies") from exc
            engine.add_data(self.data)
            self._local.engine = engine
        return engine

    def decide(self, rule: str, input: Mapping[str, Any]) -> Decision:  # `input`: Rego's own word
        """Evaluate one rule; any failure is a deny that says why (fail closed)."""
        try:
            engine = self._engine()
            engine.set_input(dict(input))
            result = engine.eval_rule(f"{PACKAGE}.{rule}")
        except BaseException as exc:  # regorus panics surface as pyo3 PanicException (a BaseException)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return self._deny(rule, f"policy_error:{_first_error(exc)}")
        if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
            return self._deny(rule, f"policy_error:rule {rule!r} gave no decision (got {str(result)[:80]})")
        lane = result.get("lane")
        return Decision(allow=result["allow"], reasons=[str(r) for r in result.get("reasons") or []],
                        lane=lane if lane in ("fast", "slow") else None, rule=rule,
                        constitutional_hash=self.constitutional_hash)

    def _deny(self, rule: str, reason: str) -> Decision:
        return Decision(allow=False, reasons=[reason], lane="slow", rule=rule,
                        constitutional_hash=self.constitutional_hash)


def _first_error(exc: BaseException) -> str:
    """regorus messages carry a Rust backtrace; keep the `error:` line (or the first line)."""
    text = str(exc).split("Stack backtrace:")[0]
    for line in text.splitlines():
        if line.strip().startswith("error:"):
            return line.strip()[len("error:"):].strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _location(message: str, path: str) -> str:
    m = re.search(r"-->\s*(\S+?):(\d+):(\d+)", message)
    return f"{m.group(1)} line {m.group(2)}" if m else path
