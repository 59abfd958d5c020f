"""`flywheel load`: both blueprint JSONL formats, bad lines reported, bounded memory."""
from __future__ import annotations

import orjson
import pytest

from ray_app.cli import main
from ray_app.config import load_settings
from ray_app.storage import open_log_store
from tests.conftest import chat_record


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    return load_settings()


def test_loads_records_and_plain_messages_lines(tmp_path, env, capsys):
    lines = [orjson.dumps(chat_record("wl", i)) for i in range(30)]
    lines += [orjson.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                         {"role": "assistant", "content": f"hello {i}"}],
                            "tools": [{"type": "function", "function": {"name": "f"}}]}) for i in range(20)]
    lines.append(orjson.dumps(chat_record("wl", 0)))  # a duplicate line
    path = tmp_path / "logs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    assert main(["load", str(path), "--workload-id", "plain", "--client-id", "c"]) == 0
    assert "loaded 50 new records (1 duplicates, 0 rejected lines)" in capsys.readouterr().out
    counts = {(w["workload_id"], w["client_id"]): w["count"] for w in open_log_store(env).workloads()}
    assert counts == {("wl", "acme"): 30, ("plain", "c"): 20}
    plain = open_log_store(env).query(workload_id="plain", limit=1)[0]
    assert plain["response"]["choices"][0]["message"]["content"].startswith("hello")
    assert plain["request"]["tools"][0]["function"]["name"] == "f"


def test_bad_lines_are_named_and_the_rest_loads(tmp_path, env, capsys):
    path = tmp_path / "mixed.jsonl"
    bad_messages = chat_record("wl2", 1)
    bad_messages["request"]["messages"] = []
    path.write_bytes(b"\n".join([orjson.dumps(chat_record("wl2", 0)), b"{broken", orjson.dumps(bad_messages),
                                 orjson.dumps({"messages": [{"role": "user", "content": "x"}]})]))
    assert main(["load", str(path)]) == 1
    err = capsys.readouterr().err
    assert "line 2: malformed JSON" in err
    assert "line 3: request.messages" in err
    assert "line 4: " in err and "workload-id" in err
    assert open_log_store(env).count("wl2", "acme") == 1


def test_missing_file_is_a_clear_error(env, capsys):
    assert main(["load", "/nonexistent.jsonl"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_100k_lines_stream_with_bounded_memory(tmp_path, env):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:
        for i in range(100_000):
            fh.write(orjson.dumps(chat_record("big", i)) + b"\n")
    from ray_app.loader import load_jsonl

    tracemalloc.start()
    stats = load_jsonl(env, path, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats.stored == 100_000 and stats.rejected == 0
    assert open_log_store(env).count("big", "acme") == 100_000
    # The file is ~25 MB and parses to several times that; one batch at a time stays far below.
    assert peak < path.stat().st_size / 3, (peak, path.stat().st_size)
