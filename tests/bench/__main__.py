"""`make bench`: run every tests/bench/bench_*.py and write one markdown table.

Each module exposes `run() -> list[dict] | None` with rows {benchmark, metric, value, unit, goal, note}; None:
nothing to measure on this machine (a GPU benchmark without a GPU), and its stored rows stay.
`python -m tests.bench ingest governance` runs only the named ones. Each module's rows are kept
in tests/bench/results/<module>.json with the time they were measured, and the table is built
from all of them, so a partial run refreshes its own rows and keeps the others.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

import tests.bench as pkg

RESULTS = Path(__file__).with_name("RESULTS.md")
STORED = Path(__file__).with_name("results")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def main(only: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if n.removeprefix("bench_") in only]
    failed = []
    STORED.mkdir(exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        started = time.time()
        try:
            rows = importlib.import_module(f"tests.bench.{name}").run()
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        if rows is None:  # nothing to measure on this machine (a GPU benchmark without a GPU)
            print("   skipped here; its stored rows stay", flush=True)
            continue
        print(f"   {time.time() - started:.0f} s", flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M")
        (STORED / f"{name}.json").write_text(json.dumps({"measured": stamp, "host": platform.node(),
                                                          "rows": rows}, indent=1, default=str))
    lines = [f"# Benchmarks\n\n`make bench` (or `python -m tests.bench NAME...`) rewrites this file from "
             f"tests/bench/results/*.json; machine: {platform.machine()}, Python {platform.python_version()}.\n",
             "| benchmark | metric | value | unit | goal | note |", "|---|---|---|---|---|---|"]
    for stored in sorted(STORED.glob("bench_*.json")):
        data = json.loads(stored.read_text())
        lines += [f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value'])} | {r.get('unit', '')} | "
                  f"{r.get('goal', '')} | {r.get('note', '')} |" for r in data["rows"]]
        lines.append(f"| {stored.stem.removeprefix('bench_')} | measured | {data['measured']} |  |  | "
                     f"on {data['host']} |")
    if failed:
        lines.append(f"\nFailed this run: {', '.join(failed)} (see the console output).")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
