"""The compiled PII scrub (ray_app/native.py): used only while it matches its source, and it gives the
source's answers."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from ray_app import native
from ray_app.governance.pii import scrub_record, scrub_text
from ray_app.simulator import SERVICES, generate
from tests.pii_corpus import record_samples, text_samples


def _sources(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for m in native.MODULES:
        (source / f"{m}.py").write_text(f"# {m}\n")
    built = tmp_path / "native"
    built.mkdir()
    return source, built


def test_a_build_is_used_only_while_it_matches_the_source_and_this_python(tmp_path):
    source, built = _sources(tmp_path)
    current = native.fingerprint(source)
    cases = {"missing": None, "current": current, "another python": {**current, "abi": ".cpython-399-x.so"},
             "unreadable": "{not json"}
    for case, manifest in cases.items():
        if manifest is not None:
            (built / native.MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        path = ["package"]
        used = native.use_compiled(path, native_dir=built, source_dir=source)
        assert used == (case == "current"), case
        assert path == ([str(built), "package"] if used else ["package"]), case
    (built / native.MANIFEST).write_text(json.dumps(current))
    (source / "pii_detect.py").write_text("# edited after the build\n")
    path = ["package"]
    assert not native.use_compiled(path, native_dir=built, source_dir=source) and path == ["package"]


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler here: the scrub runs as Python")
def test_make_native_compiled_the_scrub_and_it_is_what_runs():
    assert native.compiled_modules() == [f"{native.PACKAGE}.{m}" for m in native.MODULES], \
        "the compiled scrub is missing or older than its source: run `make native`"


def _fuzz(n: int, seed: int = 3) -> list[str]:
    """Strings made of what the detectors look at: digits of several scripts, separators, '@', dots,
    colons, letters, invisible and exotic spaces, lone surrogates."""
    alphabet = list("0123456789" * 4 + " -.()+/@:" * 2 + "abcxyzABC_,#") + [
        "\u0661", "\uff11", "\u200b", "\u00a0", "\u202f", "\u00ad", "\ud800", "é", "→"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


_AS_SOURCE = """
import json, sys
import ray_app.native
ray_app.native.use_compiled = lambda *args, **kwargs: False  # the Python source, whatever is built
from ray_app.governance import pii
assert pii.__file__.endswith(".py"), pii.__file__
texts, records = json.load(sys.stdin)
json.dump([[pii.scrub_text(t) for t in texts], [pii.scrub_record(r) for r in records]], sys.stdout)
"""


def test_the_scrub_gives_its_python_source_s_answers():
    texts = [s.text for s in text_samples()] + _fuzz(20_000)
    records = [r for r, _, _ in record_samples()]
    records += [r for service in SERVICES for r in generate(service, 300, seed=5, pii_rate=0.5)]
    here = [[scrub_text(t) for t in texts], [scrub_record(r) for r in records]]
    source = subprocess.run([sys.executable, "-c", _AS_SOURCE], input=json.dumps([texts, records]),
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(json.dumps(here)) == json.loads(source)
    assert sum(bool(counts) for _, counts in here[0]) > 3_000  # the corpus does reach the detectors
