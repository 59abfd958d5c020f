"""Every YAML file under cluster/ parses and passes the check for what it is.

The files are found by walking the folder, so a new file that does not parse, or that no
check recognises, fails the suite. The checks are Ray's own where Ray has one: the
autoscaler's JSON schema and its config preparation (what `ray up` runs before it touches a
cloud), `ServeDeploySchema` (what `serve deploy` and KubeRay's serveConfigV2 go through),
`RuntimeEnv` (what `ray job submit --runtime-env` builds), and the project's own settings
loader and `flywheel` command-line parser.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
TORCH_PIN = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)


# ---- the checks, one per kind of file --------------------------------------------------

def check_launcher(config: dict[str, Any]) -> None:
    """`ray up`: the autoscaler's schema, then its own preparation and validation (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, RAY_SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))
    for command in _all_commands(config):
        shlex.split(command)  # unbalanced quotes: e.g. a ` #` that YAML took for a comment and cut
    commands = " ".join(_all_commands(config))
    # The nodes' ray must be the ray that launches them, and torch must come first, pinned as `make setup` pins it.
    for pin in re.findall(r"ray\[[\w,]+\]==([\w.]+)", commands):
        assert pin == ray.__version__, f"ray pinned to {pin}, but this ray is {ray.__version__}"
    for setup in _setup_lists(config):
        if any("make setup" in c for c in setup):
            continue
        torch = [i for i, c in enumerate(setup) if "torch==" in c]
        project = [i for i, c in enumerate(setup) if "-e ~/flywheel" in c]
        assert torch and project and torch[0] < project[0], f"torch must be installed before the project: {setup}"
        assert f"torch=={TORCH_PIN}" in setup[torch[0]]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def check_serve_config(config: dict[str, Any]) -> None:
    """`serve deploy`: Ray's own schema, and an import path that resolves to our app builder."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    apps = {app.name: app for app in schema.applications}
    assert apps["flywheel"].import_path == "serve.app:app_builder"
    assert apps["flywheel"].route_prefix == "/"
    assert set(apps["flywheel"].args) == {"config"}
    module, attr = apps["flywheel"].import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def check_runtime_env(config: dict[str, Any]) -> None:
    """`ray job submit --runtime-env`: only fields Ray knows (it would pass others to plugins silently)."""
    from ray.runtime_env import RuntimeEnv

    unknown = set(config) - RuntimeEnv.known_fields
    assert not unknown, f"not runtime_env fields: {sorted(unknown)}"
    env = RuntimeEnv(**config)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "env_vars values must be strings"


def check_settings(path: Path) -> None:
    from ray_app.config import load_settings

    settings = load_settings(path, env={})  # unknown keys and bad values raise, naming the key
    assert settings.log_store and settings.job_store, "a multi-node cluster needs shared stores"


def check_grafana_provisioning(doc: dict[str, Any], path: Path) -> None:
    """Grafana's dashboard provisioning (apiVersion 1): file providers, each naming a folder to load."""
    assert doc.get("apiVersion") == 1, f"{path.name}: Grafana provisioning is apiVersion 1"
    for provider in doc["providers"]:
        assert provider.get("name") and provider.get("type") == "file", f"{path.name}: {provider}"
        assert provider.get("options", {}).get("path"), f"{path.name}: a file provider needs options.path"
    assert (path.parent / "flywheel.json").exists(), "the dashboard it provisions sits beside it"


def check_kubernetes(doc: dict[str, Any], path: Path) -> None:
    kind = doc.get("kind")
    assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name is required"
    if kind == "Secret":
        assert doc["apiVersion"] == "v1" and doc.get("stringData", doc.get("data"))
        return
    assert doc.get("apiVersion") == "ray.io/v1", f"{path.name}: apiVersion {doc.get('apiVersion')!r}"
    spec = doc["spec"]
    if kind == "RayCluster":
        check_ray_cluster_spec(spec, need_gpu=True)
    elif kind == "RayJob":
        entrypoint = shlex.split(spec["entrypoint"])
        assert entrypoint[:2] == ["flywheel", "run"], spec["entrypoint"]
        from ray_app.cli import _parser

        args = _parser().parse_args(entrypoint[1:])  # exits (fails the test) on an unknown or missing option
        assert args.workload_id and args.client_id
        check_runtime_env(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"))
        check_ray_cluster_spec(spec["rayClusterSpec"], need_gpu=True)
    elif kind == "RayService":
        serve_config = yaml.safe_load(spec["serveConfigV2"])  # a string holding YAML, as KubeRay wants
        check_serve_config(serve_config)
        check_ray_cluster_spec(spec["rayClusterConfig"], need_gpu=False)
    else:
        pytest.fail(f"{path.name}: no check for kind {kind!r}")


def check_ray_cluster_spec(spec: dict[str, Any], *, need_gpu: bool) -> None:
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
    containers = [c for t in [head["template"]] + [g["template"] for g in groups] for c in t["spec"]["containers"]]
    secret_names = {d["metadata"]["name"]: d for d in _load_all(CLUSTER / "kuberay" / "secret.yaml")}
    for container in containers:
        assert container["image"] and container["resources"]["limits"]
        env = {e["name"]: e for e in container.get("env", [])}
        for var in ("FLYWHEEL_LOG_STORE", "FLYWHEEL_JOB_STORE"):
            ref = env[var]["valueFrom"]["secretKeyRef"]  # from the Secret, never inline
            assert ref["key"] in secret_names[ref["name"]]["stringData"]
    gpus = [g for g in groups
            if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert bool(gpus) == need_gpu


# ---- the walk ------------------------------------------------------------------------

def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def check_file(path: Path) -> None:
    """Parse `path` and run the check for its kind; a file no check recognises fails."""
    docs = _load_all(path)  # a YAML error fails here
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: top level must be a mapping"
        if "providers" in doc:
            check_grafana_provisioning(doc, path)
        elif "apiVersion" in doc or "kind" in doc:
            check_kubernetes(doc, path)
        elif "provider" in doc:
            check_launcher(doc)
        elif "applications" in doc:
            check_serve_config(doc)
        elif path.name == "runtime_env.yaml":
            check_runtime_env(doc)
        elif path.name == "settings.yaml":
            check_settings(path)
        else:
            pytest.fail(f"{path}: no check knows this file; add one to tests/test_cluster_yaml.py")


def test_the_folder_has_every_kind():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES}
    assert {"aws.yaml", "local.yaml", "serve_config.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"} <= names
    kinds = {d.get("kind") for p in YAML_FILES for d in _load_all(p) if isinstance(d, dict)}
    assert {"RayCluster", "RayJob", "RayService", "Secret"} <= kinds


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_cluster_yaml(path):
    check_file(path)


def test_launchers_gpu_and_local_shape():
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = aws["available_node_types"]
    assert "GPU" not in types[aws["head_node_type"]]["resources"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and gpu[0]["node_config"]["InstanceType"].startswith("g5.")
    # The GPU type installs PyPI's CUDA torch; CPU nodes the CPU build.
    assert not any("whl/cpu" in c for c in gpu[0]["worker_setup_commands"])
    assert any("whl/cpu" in c for c in aws["setup_commands"])
    local = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    assert local["provider"]["type"] == "local" and local["provider"]["head_ip"] and local["provider"]["worker_ips"]


def test_rayservice_serves_what_serve_deploy_serves():
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"] == \
        yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())["applications"]


# ---- the checks can fail -----------------------------------------------------------------

@pytest.mark.parametrize("name, breakage", [
    ("broken.yaml", "cluster_name: x\nprovider: {type: aws\n"),                       # does not parse
    ("typo.yaml", "cluster_name: x\nmax_worker: 2\nprovider: {type: local, head_ip: a, worker_ips: []}\n"),
    ("cut.yaml", "cluster_name: x\nprovider: {type: local, head_ip: a, worker_ips: [b]}\n"
                 "setup_commands:\n  - echo 'export PATH=$HOME/bin  # mark' >> ~/.bashrc\n"),
    ("serve.yaml", "applications:\n  - name: flywheel\n    route_prefix: /\n    args: {config: null}\n"),
    ("runtime_env.yaml", "working_dir: .\nenvvars: {A: '1'}\n"),
    ("job.yaml", "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: j}\n"
                 "spec: {entrypoint: flywheel run --workload-id W, rayClusterSpec: {}}\n"),
    ("what.yaml", "something: else\n"),
])
def test_a_bad_file_fails(tmp_path, name, breakage):
    path = tmp_path / name
    path.write_text(breakage)
    with pytest.raises((yaml.YAMLError, jsonschema.ValidationError, AssertionError, KeyError, ValueError,
                        SystemExit, pytest.fail.Exception)):
        check_file(path)


def _setup_lists(config: dict[str, Any]) -> list[list[str]]:
    lists = [config.get("setup_commands", [])]
    lists += [t["worker_setup_commands"] for t in config.get("available_node_types", {}).values()
              if "worker_setup_commands" in t]
    return [cmds for cmds in lists if cmds]


def _all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out = [c for k in keys for c in config.get(k, [])]
    for t in config.get("available_node_types", {}).values():
        out += t.get("worker_setup_commands", [])
    return out
