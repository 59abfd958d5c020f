"""The Grafana dashboard (cluster/grafana/flywheel.json) asks only for metrics the app exports: every
name in every panel's PromQL is one a scrape of the Serve app's /metrics can hold (the replicas' own,
the governance ones and those the store collector computes), under the name Prometheus gives it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ray_app.config import Settings
from ray_app.governance.metrics import StoreCollector, governance_metrics
from ray_app.storage import open_job_store
from serve.metrics import create_metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "flywheel.json"
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def exported(tmp_path: Path) -> set[str]:
    """Every sample name a scrape can carry, from the app's own metric definitions."""
    metrics = create_metrics(None, collectors=[StoreCollector(open_job_store(Settings(data_dir=tmp_path)),
                                                              budget_epsilon=10.0, delta=1e-5)])
    governance_metrics(metrics.registry)
    text = generate_latest(metrics.registry).decode()
    return {family.name + suffix for family in text_string_to_metric_families(text) for suffix in SUFFIXES}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once label matchers, ranges, grouping
    clauses, function calls, keywords and numbers are taken out."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\b[a-z_]+\s*\(", " (", bare)
    return {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if t not in KEYWORDS}


def test_every_panel_queries_a_metric_the_app_exports(tmp_path):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    names = exported(tmp_path)
    asked = {name: panel["title"] for panel in panels for target in panel["targets"]
             for name in metric_names(target["expr"])}
    assert asked, "no metric found in any panel"
    unknown = {name: title for name, title in asked.items() if name not in names}
    assert not unknown, unknown
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("ingest", "live agreement", "routed share", "rollbacks", "privacy budget"):
        assert topic in titles, topic


def test_the_name_check_catches_a_misspelt_metric(tmp_path):
    names = exported(tmp_path)
    assert metric_names('sum by (le) (rate(flywheel_ingest_latency_seconds_bucket{x="1"}[5m]))') <= names
    assert metric_names("rate(flywheel_ingest_recrods_total[5m])") - names == {"flywheel_ingest_recrods_total"}
    assert metric_names("a_sum / ignoring(model) group_left b_count") == {"a_sum", "b_count"}
