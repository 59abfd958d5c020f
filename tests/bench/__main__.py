"""`make bench`: run every tests/bench/bench_*.py and write one markdown table.

Each module exposes `run() -> list[dict]` with rows {benchmark, metric, value, unit, goal, note}.
`python -m tests.bench ingest governance` runs only the named ones.
"""
from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

import tests.bench as pkg

RESULTS = Path(__file__).with_name("RESULTS.md")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def main(only: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if n.removeprefix("bench_") in only]
    rows, failed = [], []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.time()
        try:
            rows += importlib.import_module(f"tests.bench.{name}").run()
        except Exception:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"   {time.time() - started:.0f} s", flush=True)
    lines = [f"# Benchmarks\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
             f"({platform.machine()}, Python {platform.python_version()}); `make bench` rewrites this file.\n",
             "| benchmark | metric | value | unit | goal | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value'])} | {r.get('unit', '')} | "
              f"{r.get('goal', '')} | {r.get('note', '')} |" for r in rows]
    if failed:
        lines.append(f"\nFailed: {', '.join(failed)} (see the console output).")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
