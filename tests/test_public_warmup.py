"""The public warm-up before DP-LoRA (train/public.py): examples written from the service's shared
tool definitions and from public function-calling data (never a request the job scores on), and a
few plain steps on them that teach the answer."""
from __future__ import annotations

import copy

import torch

from ray_app.config import Settings
from tests.test_dp_training import peft_tiny
from tests.workloads import TOOLS, customer_service_records, generic_records
from train import public
from train.data import pad_rows, tokenize_example
from train.public import PHRASINGS, public_warm_up, service_examples, service_tools, warm_up
from train.public_data import load_source
from train.run_config import TrainRun
from train.tail import AnswerLoss


def _examples(records: list[dict], kind: str = "tool_calling") -> list[dict]:
    return [{"id": r["id"], "record": r, "workload_type": kind} for r in records]


def test_each_shared_tool_gives_its_phrasings_and_no_records_text():
    records = customer_service_records(40, seed=1)
    public = service_examples(_examples(records), min_records=5)
    assert len(public) == len(TOOLS) * len(PHRASINGS)
    assert {e["tool"] for e in public} == {t["function"]["name"] for t in TOOLS}
    private_texts = {m["content"] for r in records for m in r["request"]["messages"] if m["role"] == "user"}
    assert not private_texts & {e["user_text"] for e in public}
    for e in public:
        call = e["record"]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == e["tool"] and all(v == f"<{k}>" for k, v in call["arguments"].items())
        offered = e["record"]["request"]["tools"]
        assert len(offered) == len(TOOLS) and {t["function"]["name"] for t in offered} == {e["tool"]} | {
            t["function"]["name"] for t in TOOLS}


def test_a_tool_definition_few_records_carry_is_not_used():
    records = customer_service_records(40, seed=2)
    for i, r in enumerate(records):  # the first tool differs in every record: none of its versions is the service's
        r["request"]["tools"] = copy.deepcopy(TOOLS)
        r["request"]["tools"][0]["function"]["description"] = f"Variant {i}"
    kept = service_tools(_examples(records), min_records=5)
    assert sorted(kept, key=lambda t: t["function"]["name"]) == sorted(TOOLS[1:], key=lambda t: t["function"]["name"])
    assert service_tools(_examples(records[:4]), min_records=5) == []  # four records decide nothing
    assert service_examples(_examples(generic_records(20), "generic"), min_records=1) == []


def _answer_loss(peft_model, tokenizer, examples: list[dict]) -> float:
    """The mean answer loss over `examples` in eval mode (no dropout: the same number every time)."""
    ids, labels, mask = pad_rows([tokenize_example(tokenizer, e, 128) for e in examples], tokenizer.pad_token_id)
    peft_model.eval()
    with torch.no_grad():
        return AnswerLoss(peft_model)(ids, labels, mask).item()


def test_warm_up_steps_lower_the_answer_loss(tiny_model):
    peft_model, tokenizer = peft_tiny(tiny_model, top_layers=2)  # both layers of the tiny model
    public = service_examples(_examples(customer_service_records(20, seed=3)), min_records=5)
    before = _answer_loss(peft_model, tokenizer, public)
    done = warm_up(peft_model, tokenizer, public, steps=200, batch_size=8, learning_rate=2e-2,
                   max_seq_len=128, device=torch.device("cpu"), seed=0)
    assert done["public_steps"] == 200 and done["public_examples"] == len(public)
    after = _answer_loss(peft_model, tokenizer, public)
    assert after < 0.97 * before, (before, after)  # a small adapter on a random tiny model moves slowly


def test_only_a_fresh_private_run_warms_up_and_never_on_a_request_the_job_scores(tiny_model, tmp_path, monkeypatch):
    import json

    peft_model, tokenizer = peft_tiny(tiny_model)
    train, held = tmp_path / "train.json", tmp_path / "eval.json"
    train.write_text(json.dumps(_examples(customer_service_records(20, seed=4))))
    glaive = load_source("glaive")  # a job whose traffic is public data: its eval requests stay out
    held.write_text(json.dumps([{"user_text": r["request"]["messages"][-1]["content"]} for r in glaive[:50]]))
    training = {"learning_rate": 1e-3, "max_seq_len": 128, "privacy": {"enabled": True},
                "public_warmup": {"steps": 2, "batch_size": 4, "min_records": 5, "sources": ["glaive", "sgd"],
                                  "max_public_examples": 1000}}
    run = TrainRun(model="tiny", settings=Settings.model_validate({"data_dir": str(tmp_path), "training": training}),
                   train_path=train, held_out_paths=[held, tmp_path / "none"], seed=0)
    cpu = torch.device("cpu")
    seen = []
    monkeypatch.setattr(public, "warm_up", lambda model, tok, examples, **kw: seen.extend(examples) or {
        "public_examples": len(examples), "public_steps": kw["steps"]})
    assert public_warm_up(run, peft_model, tokenizer, cpu, resuming=False)["public_steps"] == 2
    texts = {e["user_text"] for e in seen}
    assert {e["tool"] for e in seen} >= {t["function"]["name"] for t in TOOLS}  # the service's tools
    assert len([e for e in seen if e["id"].startswith("nestful-glaive")]) == len(glaive) - 50
    assert not texts & {r["request"]["messages"][-1]["content"] for r in glaive[:50]}
    monkeypatch.undo()
    assert public_warm_up(run, peft_model, tokenizer, cpu, resuming=True)["public_steps"] == 0
    not_private = run.settings.with_overrides({"training": {"privacy": {"enabled": False}}})
    plain = run.model_copy(update={"settings": not_private})
    assert public_warm_up(plain, peft_model, tokenizer, cpu, resuming=False)["public_steps"] == 0
