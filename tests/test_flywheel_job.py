"""The flywheel job end to end on the embedded stores, with a tiny model (seconds, not minutes).

What is checked is the machinery: stages, reports, failures, cancellation and resume, and
the governance decisions (training approval, promotion gate, audit chain).
Whether a real model learns the task is measured in tests/bench/bench_flywheel.py.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from ray_app import governance
from ray_app.config import Settings
from ray_app.demo import for_terminal
from ray_app.errors import JobCancelled, JobFailed, NotFound
from ray_app.governance.audit import verify
from ray_app.schemas import Job
from ray_app.storage import open_audit_store, open_job_store, open_log_store
from tests.workloads import customer_service_records, generic_records
from train import gates
from train.flywheel_job import run_job

WORKLOAD, CLIENT = "customer-service", "acme"


def make_settings(data_dir: Path, models: list[str], **overrides) -> Settings:
    base = {
        "data_dir": str(data_dir),
        "data_split": {"eval_size": 8, "val_ratio": 0.1, "min_total_records": 20, "random_seed": 1},
        "icl_config": {"example_selection": "uniform_distribution", "max_examples": 2},
        "candidates": [{"model": m} for m in models],
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 256,
                     "checkpoint_every": 2,
                     "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}},
    }
    return Settings.model_validate({**base, **overrides})


def load(settings: Settings, records: list[dict]) -> None:
    open_log_store(settings).put_many(records)


@pytest.fixture()
def settings(tmp_path, tiny_model, ray_session):
    s = make_settings(tmp_path, [tiny_model])
    load(s, customer_service_records(48, seed=2))
    return s


def test_end_to_end_report_with_a_bad_candidate_failing_alone(settings, tiny_model, tmp_path):
    s = make_settings(settings.data_dir, ["no-such-org/no-such-model", tiny_model])
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT, out_dir=tmp_path / "out")
    for key in ("job_id", "workload_id", "client_id", "constitutional_hash", "num_records", "splits",
                "candidates", "recommendation"):
        assert key in report
    assert report["num_records"] == 48
    assert report["splits"]["eval"] == 8 and report["splits"]["icl_examples"] == 2
    bad, cand = report["candidates"]
    assert bad["status"] == "failed" and "no-such-org/no-such-model" in bad["error"]
    assert cand["status"] == "completed" and cand["parameters"] > 10_000
    for eval_type in ("base", "icl", "customized"):
        scores = cand["evaluations"][eval_type]
        assert scores["n"] == 8 and 0.0 <= scores["function_name_accuracy"] <= 1.0
        assert "compliance_rate" in scores
    assert cand["training"]["steps"] >= 1 and 0 < cand["training"]["epsilon"] <= 8.0 + 1e-6
    # the default DP path: B alone trains after the warm-up, its records' gradients from its own backward
    assert cand["training"]["clipping"] == "in_layer" and cand["training"]["passes_per_step"] >= 1
    assert cand["evaluations"]["base"]["compliance_check"] == "governance"
    for other in ("icl", "base"):  # paired on the same 8 examples: the net wins are the accuracy gap
        test = cand["comparisons"][f"customized_vs_{other}"]
        assert test["wins"] + test["losses"] + test["ties"] == 8 and 0.0 < test["p_value"] <= 1.0
        gap = cand["evaluations"]["customized"]["function_name_accuracy"] - cand["evaluations"][other][
            "function_name_accuracy"]
        assert test["wins"] - test["losses"] == round(gap * 8)
    assert bad["comparisons"] == {}
    assert cand["cost"]["tokens_per_second"] > 0 and cand["cost"]["usd_per_million_tokens"] > 0
    assert cand["cost"] == cand["cost_by_eval_type"]["customized"]  # the model's price: its customized run's
    assert set(cand["cost_by_eval_type"]) == {"base", "icl", "customized"}
    assert all(c["usd_per_million_tokens"] > 0 for c in cand["cost_by_eval_type"].values())
    rec = report["recommendation"]  # an untrained tiny model is far below the 0.9 threshold
    assert rec["model"] is None and rec["promoted"] is False
    assert rec["policy_decision"]["allow"] is False
    assert rec["policy_decision"]["reasons"][0].startswith("no_recommendation: no candidate reached")
    assert "Promoted: **no**" in (tmp_path / "out" / "report.md").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "customized vs in-context, function name: better on" in md and "whole call: better on" in md
    cur, splits = report["curation"], report["splits"]  # the counts a reader adds up
    assert cur["kept"] == splits["train"] + splits["val"] + splits["eval"]
    assert cur["exported"] == cur["duplicates"] + cur["non_compliant"] + cur["kept"]
    assert f"| {cur['exported']} | {cur['duplicates']} | {cur['non_compliant']} | {cur['kept']} | " in md
    assert "## Training and privacy" in md and "DP-SGD, in_layer clipping" in md
    scores = cand["evaluations"]["customized"]
    low, high = scores["function_name_accuracy_ci"]
    assert f"{scores['function_name_accuracy']:.2f} [{low:.2f}, {high:.2f}]" in md  # every score with its interval
    assert f"${report['production']['usd_per_million_tokens']:.2f} per 1M tokens" in md
    assert report["threshold"] == 0.9 and all(st["status"] != "running" for st in report["stages"])
    for name in ("report.json", "report.md", "accuracy.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    shown = for_terminal((tmp_path / "out" / "report.md").read_text(), tmp_path / "out")  # as make demo prints it
    assert f"accuracy plot: `{tmp_path / 'out' / 'accuracy.png'}`" in shown and "![" not in shown
    assert json.loads((tmp_path / "out" / "report.json").read_text())["job_id"] == report["job_id"]
    job = open_job_store(s).get_job(report["job_id"])
    assert job["status"] == "completed" and job["report_dir"] == str(tmp_path / "out")
    failed = [st for st in job["stages"] if st["status"] != "completed"]
    assert [st["name"] for st in failed] == ["no-such-org/no-such-model:evaluate_base"] and failed[0]["error"]
    assert all(st["finished_at"] >= st["started_at"] for st in job["stages"])
    assert {e["eval_type"] for e in job["evaluations"]} == {"base", "icl", "customized"}
    assert len(job["trainings"]) == 1


def test_each_eval_type_is_priced_from_its_own_run(tmp_path):
    """In-context prompts carry their examples: fewer tokens an hour, a higher price. The cheapest
    configuration meeting the threshold wins, not the most accurate one."""
    from train.report import recommend

    def priced(usd):
        return {"usd_per_million_tokens": usd, "tokens_per_second": 1.0, "latency_ms_p50": 1.0}

    scores = {"base": {"function_name_accuracy": 0.1, "n": 20}, "icl": {"function_name_accuracy": 0.95, "n": 20},
              "customized": {"function_name_accuracy": 0.9, "n": 20}}
    cand = {"model": "m", "evaluations": scores, "cost": priced(0.2),
            "cost_by_eval_type": {"base": priced(0.2), "icl": priced(0.26), "customized": priced(0.2)}}
    settings = make_settings(tmp_path, ["m"])
    rec = recommend(settings, "tool_calling", [cand])
    assert (rec["eval_type"], rec["usd_per_million_tokens"], rec["cost_reduction"]) == ("customized", 0.2, 0.98)
    cand["evaluations"]["customized"] = {"function_name_accuracy": 0.85, "n": 20}  # below 0.9: ICL, at its price
    rec = recommend(settings, "tool_calling", [cand])
    assert (rec["eval_type"], rec["usd_per_million_tokens"], rec["cost_reduction"]) == ("icl", 0.26, 0.974)


def test_nothing_usable_fails_the_job_with_a_reason(settings):
    s = make_settings(settings.data_dir, ["no-such-org/no-such-model"])
    with pytest.raises(JobFailed, match="no candidate produced an evaluation"):
        run_job(s, workload_id=WORKLOAD, client_id=CLIENT)
    (job,) = [j for j in open_job_store(s).list_jobs() if j["status"] == "failed"]
    assert "no candidate" in job["error"]


@pytest.mark.parametrize(("records", "match"), [
    (customer_service_records(10, seed=3, workload_id="small"), "only 10 usable records"),
    ([{**r, "workload_id": "small", "response": {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}}
      for r in customer_service_records(30, seed=4)], "no_tool_call=30"),
])
def test_too_few_usable_records(settings, tmp_path, records, match):
    load(settings, records)
    with pytest.raises(JobFailed, match=match):
        run_job(settings, workload_id="small", client_id=CLIENT, out_dir=tmp_path / "none")
    assert not (tmp_path / "none" / "report.json").exists()


def test_unknown_workload_is_a_clear_error_and_no_report(settings, tmp_path):
    with pytest.raises(NotFound, match="no records for workload 'ghost'"):
        run_job(settings, workload_id="ghost", client_id=CLIENT, out_dir=tmp_path / "ghost")
    assert not (tmp_path / "ghost").exists()
    (job,) = open_job_store(settings).list_jobs(workload_id="ghost")
    assert job["status"] == "failed" and "ghost" in job["error"]


def test_cancel_mid_run_then_resume(settings, tiny_model, tmp_path):
    store = open_job_store(settings)
    job = store.create_job(Job(workload_id=WORKLOAD, client_id=CLIENT).model_dump(mode="json"))

    def cancel_when_training_starts():
        deadline = time.time() + 300
        while time.time() < deadline:
            stages = {s["name"]: s["status"] for s in store.get_job(job["id"])["stages"]}
            if stages.get(f"{tiny_model}:train") == "running":
                store.update_job(job["id"], lambda j: j.update(cancel_requested=True))
                return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_when_training_starts)
    canceller.start()
    with pytest.raises(JobCancelled):
        run_job(settings, workload_id=WORKLOAD, client_id=CLIENT, job_id=job["id"])
    canceller.join()
    cancelled = store.get_job(job["id"])
    assert cancelled["status"] == "cancelled"
    stages = {s["name"]: s for s in cancelled["stages"]}
    assert stages[f"{tiny_model}:train"]["status"] == "cancelled"
    assert stages[f"{tiny_model}:evaluate_base"]["status"] == "completed"

    report = run_job(settings, workload_id=WORKLOAD, client_id=CLIENT, job_id=job["id"])
    resumed = {s["name"]: s for s in store.get_job(job["id"])["stages"]}
    for name in ("curate", "select_icl", f"{tiny_model}:evaluate_base", f"{tiny_model}:evaluate_icl"):
        assert resumed[name]["finished_at"] == stages[name]["finished_at"], f"{name} ran again"
    assert resumed[f"{tiny_model}:train"]["status"] == "completed"
    assert report["candidates"][0]["evaluations"]["customized"]["n"] == 8


def test_comparisons_pair_evaluations_by_example_id():
    from train.report import comparisons

    evaluations = {"base": {"per_example": {"a": 0.0, "b": 0.0, "c": 1.0}},
                   "icl": {"per_example": {"b": 1.0, "c": 1.0, "z": 0.0}},  # "z" is in no other run
                   "customized": {"per_example": {"c": 1.0, "b": 1.0, "a": 1.0}}}
    out = comparisons(evaluations)
    assert out["customized_vs_icl"] == {"wins": 0, "losses": 0, "ties": 2, "p_value": 1.0}
    assert out["customized_vs_base"] == {"wins": 2, "losses": 0, "ties": 1, "p_value": 0.5}
    evaluations["icl"] = None  # failed: nothing to pair with
    evaluations["base"] = {"scores": {}}  # from before per-example values were kept
    assert comparisons(evaluations) == {}


def test_generic_workload_scores_similarity(tmp_path, tiny_model, ray_session):
    s = make_settings(tmp_path, [tiny_model], icl_config={"example_selection": "semantic_similarity"})
    load(s, generic_records(30, seed=5))
    report = run_job(s, workload_id="faq", client_id="acme")
    scores = report["candidates"][0]["evaluations"]["customized"]
    assert "similarity" in scores and "function_name_accuracy" not in scores
    assert -1.0 <= scores["similarity"] <= 1.0
    test = report["candidates"][0]["comparisons"]["customized_vs_base"]
    assert test["wins"] + test["losses"] + test["ties"] == scores["n"]


def _audit(settings: Settings, job_id: str) -> list[dict]:
    return [e for e in open_audit_store(settings).entries() if e["event"]["payload"].get("job_id") == job_id]


def test_promotion_gate_decides_and_every_step_is_on_a_valid_audit_chain(tmp_path, tiny_model, ray_session):
    s = make_settings(tmp_path, [tiny_model], governance={"thresholds": {"tool_calling": 0.0}})
    load(s, customer_service_records(48, seed=2))
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT, out_dir=tmp_path / "out")
    rec = report["recommendation"]
    assert rec["model"] == tiny_model and rec["compliance_rate"] >= 0.95
    assert rec["promoted"] is True, rec["policy_decision"]
    assert rec["policy_decision"]["allow"] is True and rec["policy_decision"]["rule"] == "promotion"
    assert rec["policy_decision"]["reasons"] == [] and rec["policy_decision"]["lane"] in ("fast", "slow")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["recommendation"]
    assert saved["promoted"] is True and saved["policy_decision"] == rec["policy_decision"]
    assert "Promoted: **yes**" in (tmp_path / "out" / "report.md").read_text()

    entries = _audit(s, report["job_id"])
    types = [e["event"]["type"] for e in entries]
    assert {"job_stage", "policy_decision", "training", "promotion"} <= set(types)
    stages = {(e["event"]["payload"]["stage"], e["event"]["payload"]["status"]) for e in entries
              if e["event"]["type"] == "job_stage"}
    for name in ("job", "curate", "select_icl", f"{tiny_model}:train", "report"):
        assert (name, "running") in stages and ((name, "completed") in stages or name == "job")
    (training,) = [e["event"]["payload"] for e in entries if e["event"]["type"] == "training"]
    assert training["model"] == tiny_model and 0 < training["epsilon"] <= 8.0 + 1e-6 and training["steps"] >= 1
    (approval,) = [e["event"] for e in entries if e["event"]["type"] == "policy_decision"]
    assert approval["outcome"] == "allowed" and approval["payload"]["decision"]["rule"] == "model_fine_tuning"
    (promotion,) = [e["event"] for e in entries if e["event"]["type"] == "promotion"]
    assert promotion["outcome"] == "promoted" and promotion["payload"]["inputs"]["threshold"] == 0.0
    assert verify(open_audit_store(s)).ok

    # The same report before a stricter gate: denied, with the policy's reason, and audited.
    strict = s.with_overrides({"governance": {"thresholds": {"tool_calling": 1.01}}})
    audit = governance.from_settings(strict).audit
    denied = gates.promote(strict, audit, json.loads(json.dumps(report)))["recommendation"]
    assert denied["promoted"] is False and denied["policy_decision"]["allow"] is False
    assert any(r.startswith("accuracy_below_threshold:") for r in denied["policy_decision"]["reasons"])
    last = [e["event"] for e in _audit(s, report["job_id"]) if e["event"]["type"] == "promotion"][-1]
    assert last["outcome"] == "denied" and last["payload"]["decision"] == denied["policy_decision"]
    assert verify(open_audit_store(s)).ok


@pytest.mark.parametrize(("privacy", "reason"), [
    ({"enabled": False}, "differential_privacy_disabled"),
    ({"enabled": True, "target_epsilon": 9.0, "delta": 1e-5}, "epsilon_above_limit:9"),
])
def test_training_denied_by_policy_fails_only_that_train_stage(tmp_path, tiny_model, ray_session, privacy, reason):
    s = make_settings(tmp_path, [tiny_model])
    s = s.with_overrides({"training": {"privacy": privacy}})
    load(s, customer_service_records(48, seed=2))
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT, out_dir=tmp_path / "out")
    (cand,) = report["candidates"]
    assert cand["status"] == "failed" and cand["error"].startswith("train: fine-tuning denied by policy")
    assert reason in cand["error"]
    assert cand["evaluations"]["base"]["n"] == 8 and cand["evaluations"]["icl"]["n"] == 8
    assert cand["evaluations"]["customized"] is None and cand["training"]["steps"] is None
    stages = {st["name"]: st for st in open_job_store(s).get_job(report["job_id"])["stages"]}
    assert stages[f"{tiny_model}:train"]["status"] == "failed" and reason in stages[f"{tiny_model}:train"]["error"]
    assert f"{tiny_model}:evaluate_customized" not in stages
    assert stages["report"]["status"] == "completed"
    entries = _audit(s, report["job_id"])
    (denial,) = [e["event"] for e in entries if e["event"]["type"] == "policy_decision"]
    assert denial["outcome"] == "denied" and any(reason in r for r in denial["payload"]["decision"]["reasons"])
    assert not [e for e in entries if e["event"]["type"] == "training"]
    assert verify(open_audit_store(s)).ok


def test_dp_lora_spends_a_measured_privacy_budget(tmp_path, tiny_model, ray_session):
    s = make_settings(tmp_path, [tiny_model], training={
        "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 256,
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}})
    load(s, customer_service_records(48, seed=2))
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT)
    training = report["candidates"][0]["training"]
    assert 0 < training["epsilon"] <= 8.0 + 1e-6
    assert training["delta"] == 1e-5 and training["noise_multiplier"] > 0
    # Opacus samples each example with probability 1 / (batches per epoch)
    assert training["sample_rate"] == pytest.approx(1 / math.ceil(report["splits"]["train"] / 8))
    from ray_app.privacy import composed_epsilon, read_ledger

    (run,) = read_ledger(open_job_store(s), WORKLOAD, CLIENT)["runs"]  # the run is on the privacy ledger
    assert run["job_id"] == report["job_id"] and run["steps"] == training["steps"]
    assert composed_epsilon([(run["noise_multiplier"], run["sample_rate"], run["steps"])], 1e-5) == pytest.approx(
        training["epsilon"])
    # the run names its records (per-record accounting) and the report says what the budget has left
    assert run["num_records"] == report["splits"]["train"]
    budget = training["privacy_budget"]
    assert budget["budget_epsilon"] == 14.0 and budget["spent"] == 0.0 and budget["fresh"] == budget["records"]
    markdown = Path(s.data_dir) / "reports" / report["job_id"] / "report.md"
    assert f"privacy budget 14: spent 0.00 before (0 earlier runs), {budget['after']:.2f} after" in markdown.read_text()
