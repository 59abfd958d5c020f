"""The client installs on its own: `pip install ./client` (flywheel-client) pulls httpx and orjson, nothing heavy.

The live test builds a bare venv, installs the distribution into it, and logs to the real Serve app from
there; the static test keeps the shipped sources to the standard library, httpx and orjson.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.conftest import ADMIN_KEY, chat_record

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("ray_app/__init__.py", "ray_app/errors.py", "ray_app/client")  # client/ray_app/* link to these
LIGHT = set(sys.stdlib_module_names) | {"httpx", "orjson"}

# Runs in the bare venv, isolated (-I) and outside the checkout, so only the installed package is seen.
SCRIPT = """
import importlib.util, json, sys
heavy = [m for m in ("torch", "ray", "transformers", "pydantic") if importlib.util.find_spec(m)]
assert not heavy, heavy
import ray_app
import ray_app.client.openai_wrapper
from ray_app.client import FlywheelClient
assert ray_app.__file__.startswith(sys.prefix), ray_app.__file__
client = FlywheelClient(sys.argv[1], api_key=sys.argv[2])
ids = [client.log(record) for record in json.load(sys.stdin)]
assert client.flush(timeout=30.0) is True
client.close()
print(json.dumps(ids))
"""


def _run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _install_client(tmp_path: Path) -> str:
    """`pip install ./client` into a bare venv, from a copy of the checkout's shape (the links kept)
    so that the build's files land in tmp_path and not in the working tree."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "client", checkout / "client", symlinks=True,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    (checkout / "ray_app").symlink_to(ROOT / "ray_app")  # where client/ray_app's relative links lead
    venv.create(tmp_path / "venv", with_pip=True)  # no system site packages
    python = str(tmp_path / "venv" / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "./client"], cwd=checkout)
    return python


def test_installed_client_logs_to_the_live_app(tmp_path, app_url, api, workload_id):
    python = _install_client(tmp_path)
    records = [chat_record(workload_id, i) for i in range(5)]
    out = _run([python, "-I", "-c", SCRIPT, app_url, ADMIN_KEY], input=json.dumps(records), cwd=tmp_path)
    ids = json.loads(out)
    stored = api.get("/v1/logs", params={"workload_id": workload_id, "limit": 100}).json()["records"]
    assert sorted(r["id"] for r in stored) == sorted(ids) and len(set(ids)) == 5


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_shipped_sources_import_only_light_modules():
    links = {str((ROOT / "client" / name).resolve().relative_to(ROOT)) for name in SHIPPED}
    assert links == set(SHIPPED)  # the links survived the checkout and point at the one source
    files = [p for name in SHIPPED for p in ([ROOT / name] if name.endswith(".py") else (ROOT / name).glob("*.py"))]
    wrong = {f"{p.relative_to(ROOT)}: {m}" for p in files for m in _imports(p)
             if m.split(".")[0] not in LIGHT and m not in ("ray_app.errors", "ray_app.client")
             and not m.startswith("ray_app.client.")}
    assert not wrong, wrong
