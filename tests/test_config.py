"""Settings: defaults from the seed, aliases, YAML + env precedence, errors that name the key."""
from __future__ import annotations

import pytest

from ray_app.config import CONSTITUTIONAL_HASH, load_settings
from ray_app.errors import ConfigError


def test_defaults_carry_the_seed_knobs():
    s = load_settings(env={})
    assert s.min_records_for_evaluation == 50
    assert s.data_split.eval_size == 20 and s.data_split.val_ratio == 0.1
    assert s.threshold_for("constitutional_ai") == 0.95
    assert s.threshold_for("policy_governance") == 0.90
    assert s.governance.constitutional_hash == CONSTITUTIONAL_HASH == "cdd01ef066bc6cf2"
    assert s.training.privacy.target_epsilon == 8.0 and s.training.privacy.delta == 1e-5
    assert [c.model for c in s.candidates] == ["smollm2-135m"]


def test_yaml_then_env(tmp_path):
    cfg = tmp_path / "f.yaml"
    cfg.write_text("data_split: {eval_dataset_size: 7, validation_ratio: 0.2, min_records_for_evaluation: 9}\n"
                   "candidates: [{model: smollm2-135m}, {model: gemma3-270m}]\n"
                   "log_store: elasticsearch://yaml:9200\n")
    s = load_settings(env={"FLYWHEEL_CONFIG": str(cfg), "FLYWHEEL_LOG_STORE": "elasticsearch://env:9200"})
    assert (s.data_split.eval_size, s.data_split.val_ratio, s.min_records_for_evaluation) == (7, 0.2, 9)
    assert [c.model for c in s.candidates] == ["smollm2-135m", "gemma3-270m"]
    assert s.log_store == "elasticsearch://env:9200"  # the environment wins over the file


@pytest.mark.parametrize("yaml_text, needle", [
    ("training: {epocs: 3}", "training.epocs: unknown key"),
    ("data_split: {val_ratio: 1.5}", "data_split.val_ratio"),
    ("training: {lora: {r: zero}}", "training.lora.r"),
    ("training: {max_steps: 0}", "training.max_steps"),
    ("serve: {ingress: nginx}", "serve.ingress: Input should be 'proxy' or 'haproxy' (got 'nginx')"),
    ("candidates: []", "at least one candidate"),
    ("- just\n- a list", "must hold a mapping"),
    ("a: [unclosed", "not valid YAML"),
])
def test_bad_config_names_the_problem(tmp_path, yaml_text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert needle in err.value.message


def test_bad_value_is_quoted(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("training: {batch_size: -4}")
    with pytest.raises(ConfigError, match=r"training.batch_size: .*\(got -4\)"):
        load_settings(cfg, env={})


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings("/nonexistent/flywheel.yaml", env={})


def test_job_overrides_merge_deeply():
    s = load_settings(env={}).with_overrides({"training": {"lora": {"r": 8}}})
    assert s.training.lora.r == 8 and s.training.lora.alpha == 4 and s.training.epochs == 8
