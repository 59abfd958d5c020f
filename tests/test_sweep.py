"""The sweep stage with a tiny model: Ray Tune trials of Ray Train runs, ASHA, the frontier, failures.

Whether ASHA saves trial time over the full grid at the same best accuracy, on the real models,
is measured in tests/bench/bench_sweep.py.
"""
from __future__ import annotations

import json

import pytest

from ray_app.config import Settings
from ray_app.errors import ConfigError, JobFailed
from ray_app.privacy import read_ledger
from ray_app.storage import open_job_store
from tests.test_flywheel_job import CLIENT, WORKLOAD, load, make_settings
from tests.workloads import customer_service_records
from train import frontier
from train.flywheel_job import run_job


def sweep_settings(data_dir, model: str, **sweep) -> Settings:
    grid = {"enabled": True, "lora_r": [4, 8], "learning_rate": [1e-3, 3e-2], "dp": [True, False],
            "max_epochs": 2, "grace_period": 1, "reduction_factor": 2, **sweep}
    return make_settings(data_dir, [model], sweep=grid, governance={"thresholds": {"tool_calling": 0.0}})


def test_sweep_stage_trials_frontier_and_recommendation(tmp_path, tiny_model, ray_session):
    s = sweep_settings(tmp_path, tiny_model)
    load(s, customer_service_records(60, seed=2))
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT, out_dir=tmp_path / "out")
    block = report["sweep"]
    assert block["scheduler"] == "asha" and block["metric"] == "val_loss"
    trials = block["trials"]
    assert len(trials) == 8  # 1 model x 2 ranks x 2 rates x DP on/off
    denied = [t for t in trials if not t["dp"]]
    assert {t["status"] for t in denied} == {"denied"}
    assert all("differential_privacy_disabled" in t["error"] for t in denied)
    ran = [t for t in trials if t["dp"]]
    assert {t["status"] for t in ran} <= {"completed", "stopped_early"}, [t["error"] for t in ran]
    for t in ran:
        assert len(t["val_losses"]) == t["epochs_done"] >= 1 and t["trial_seconds"] > 0
        assert 0 < t["training"]["epsilon"] <= 8.0 + 1e-6 and t["training"]["steps"] >= 1
        if t["status"] == "completed":
            assert t["epochs_done"] == 2 and t["scores"]["n"] == 8 and t["accuracy"] is not None
        else:  # ASHA stopped it at a rung: never scored
            assert t["epochs_done"] < 2 and t["scores"] is None
    assert block["stopped_early"] == sum(t["status"] == "stopped_early" for t in trials)
    assert block["trial_epochs_total"] == sum(t["epochs_done"] for t in ran)

    # The frontier: cheapest first, strictly more accurate at each step, nothing outside it beats it.
    front, points = block["frontier"], block["points"]
    assert front and len(points) >= len(front)
    costs = [p["usd_per_million_tokens"] for p in front]
    accs = [p["accuracy"] for p in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(set(accs)) == len(accs)
    for p in points:
        assert any(f["usd_per_million_tokens"] <= p["usd_per_million_tokens"] and f["accuracy"] >= p["accuracy"]
                   for f in front), f"{p} is not covered by the frontier"
    scored = {t["trial"] for t in ran if t["status"] == "completed"}
    assert {p["trial"] for p in points if p["source"] == "sweep"} == scored

    # The recommendation is the cheapest frontier point meeting the threshold (0 here), from measurements.
    rec = report["recommendation"]
    best = front[0]
    assert (rec["model"], rec["source"], rec.get("trial")) == (best["model"], best["source"], best["trial"])
    assert rec["cost_reduction"] == pytest.approx(1 - best["usd_per_million_tokens"] / 10.0, abs=1e-4)
    assert rec["promoted"] in (True, False) and rec["policy_decision"]["rule"] == "promotion"

    out = tmp_path / "out"
    assert (out / "frontier.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "## Cost/accuracy frontier" in md and "![frontier](frontier.png)" in md
    assert json.loads((out / "report.json").read_text())["sweep"]["frontier"] == front

    job = open_job_store(s).get_job(report["job_id"])
    stage = next(st for st in job["stages"] if st["name"] == "sweep")
    assert stage["status"] == "completed" and len(stage["result"]["trials"]) == 8  # stored with the job
    runs = read_ledger(open_job_store(s), WORKLOAD, CLIENT)["runs"]
    assert len(runs) == 1 + len(ran)  # the candidate's training and every sweep trial that trained


def test_a_sweep_whose_trials_all_fail_fails_the_job_naming_each(tmp_path, tiny_model, ray_session):
    # An epsilon no noise can reach: Opacus refuses inside every trial's Train worker.
    s = sweep_settings(tmp_path, tiny_model, dp=[True], target_epsilon=[1e-9], lora_r=[4], max_epochs=1)
    load(s, customer_service_records(60, seed=2))
    with pytest.raises(JobFailed, match="every sweep trial failed") as failed:
        run_job(s, workload_id=WORKLOAD, client_id=CLIENT, out_dir=tmp_path / "out")
    for trial in ("t00", "t01"):
        assert f"{trial} {tiny_model}: failed" in str(failed.value)
    assert "privacy budget is too low" in str(failed.value)
    (job,) = open_job_store(s).list_jobs(workload_id=WORKLOAD)
    assert job["status"] == "failed" and "every sweep trial failed" in job["error"]
    stage = next(st for st in job["stages"] if st["name"] == "sweep")
    assert stage["status"] == "failed"
    assert not (tmp_path / "out" / "report.json").exists()


def test_pareto_keeps_only_undominated_points():
    def p(model, usd, acc):
        return {"model": model, "usd_per_million_tokens": usd, "accuracy": acc}

    pts = [p("a", 1.0, 0.5), p("a", 1.0, 0.7), p("b", 2.0, 0.6), p("b", 2.0, 0.9), p("c", 3.0, 0.9), p("d", 0.5, 0.1)]
    assert [(x["model"], x["accuracy"]) for x in frontier.pareto(pts)] == [("d", 0.1), ("a", 0.7), ("b", 0.9)]


@pytest.mark.parametrize(("sweep", "match"), [
    ({"enabled": True, "bogus": 1}, "sweep.bogus: unknown key"),
    ({"grace_period": 4, "max_epochs": 2}, "grace_period=4 exceeds sweep.max_epochs=2"),
    ({"models": ["not-a-candidate"]}, "not candidates"),
    ({"lora_r": []}, "sweep.lora_r"),
    ({"trial_resources": {"gpu": 1.5}}, "trial_resources.gpu"),
])
def test_bad_sweep_config_names_the_key(tmp_path, sweep, match):
    with pytest.raises(ConfigError, match=match):
        Settings(data_dir=tmp_path).with_overrides({"sweep": sweep})
