"""The shape of the code: one direction of imports, no stray environment reads, no import-time settings."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray_app", "serve", "train", "evals")
# Who may import whom: serve -> (evals ->) ray_app, train -> evals -> ray_app. Serve reaches evals only
# for the model it serves (serve/model_server.py): the decoder the evaluation measured is the one serving.
ALLOWED = {"ray_app": {"ray_app"}, "serve": {"serve", "evals", "ray_app"}, "evals": {"evals", "ray_app"},
           "train": {"train", "evals", "ray_app"}}


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield pkg, path, ast.parse(path.read_text(), filename=str(path))


def _imported_packages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_imports_go_one_way():
    wrong = [f"{path.relative_to(ROOT)} imports {bad}"
             for pkg, path, tree in _modules() for bad in _imported_packages(tree) - ALLOWED[pkg]]
    assert not wrong, wrong


def test_environment_is_read_only_in_config():
    readers = []
    for _, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(str(path.relative_to(ROOT)))
    assert sorted(set(readers)) == ["ray_app/config.py"]


def test_no_settings_built_at_import():
    offenders = []
    for _, path, tree in _modules():
        for node in tree.body:  # module level only
            if isinstance(node, ast.Assign | ast.Expr) and isinstance(getattr(node, "value", None), ast.Call):
                func = node.value.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in ("Settings", "load_settings"):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_files_stay_short():
    long_files = [f"{p.relative_to(ROOT)}: {n}" for _, p, _ in _modules()
                  if (n := len(p.read_text().splitlines())) > 350]
    assert not long_files, long_files


def test_functions_stay_short():
    """Under ~60 lines each, so one reads at a glance (docstrings and comments count)."""
    long_functions = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
                      for _, path, tree in _modules() for node in ast.walk(tree)
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_functions, long_functions


def test_the_training_loop_reads_its_config_typed():
    """train/lora.py gets a TrainRun (train/run_config.py): no `config["..."]` or `.get("...")` on it."""
    tree = ast.parse((ROOT / "train" / "lora.py").read_text())
    by_key = [node.lineno for node in ast.walk(tree)
              if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                  and node.value.id in ("config", "privacy", "lora", "warmup", "training"))
              or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == "config")]
    assert not by_key, f"train/lora.py reads settings by string key at lines {by_key}"
