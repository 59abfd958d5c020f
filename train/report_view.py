"""What a reader sees of a report: report.md and accuracy.png (train/report.py builds the data).

Read by someone who did not set the job up: every count adds up (exported = duplicates +
non-compliant + kept; kept = train + val + eval), every score carries its 95% interval, each cost
stands beside the production price it is meant to undercut, and privacy (what DP spent, over how
many steps, in how long) is stated where the scores are, since it is the reason the scores are what
they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from train import frontier
from train.candidate import EVAL_TYPES

EVAL_NAMES = {"base": "base", "icl": "in-context", "customized": "customized"}
METRICS = (("function_name_accuracy", "function name"), ("function_args_accuracy", "whole call"),
           ("similarity", "similarity"), ("compliance_rate", "compliance"))
FREE_METRICS = ("function_name_accuracy", "function_args_accuracy")


def _score(scores: dict[str, Any], key: str) -> str:
    value, ci = scores.get(key), scores.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def _rows(report: dict[str, Any]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    return [(c, t, c["evaluations"][t]) for c in report["candidates"] for t in EVAL_TYPES if c["evaluations"].get(t)]


def data_section(report: dict[str, Any]) -> list[str]:
    cur, splits = report.get("curation") or {}, report["splits"]
    return ["## Data", "",
            "| exported | duplicates | non-compliant | kept | train | val | eval | in-context pool |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            (f"| {cur.get('exported', report['num_records'])} | {cur.get('duplicates', '-')} | "
             f"{cur.get('non_compliant', '-')} | {cur.get('kept', '-')} | {splits['train']} | {splits['val']} | "
             f"{splits['eval']} | {splits.get('icl_examples', '-')} |"), ""]


def scores_section(report: dict[str, Any]) -> list[str]:
    rows = _rows(report)
    metrics = [(k, name) for k, name in METRICS if any(k in s for _, _, s in rows)]
    free = [k for k in FREE_METRICS if any(k in ((c.get("free_evaluations") or {}).get(t) or {}) for c, t, _ in rows)]
    head = [name for _, name in metrics] + [f"free: {dict(METRICS)[k]}" for k in free] + ["$ / 1M tokens", "tokens/s"]
    lines = ["## Scores", "", ("Against the production model's answers (production = 1.0), 95% Wilson intervals. "
                               "Tool calls are decoded under the request's tools' schemas; *free* is the same model "
                               "without them."), "",
             "| model | eval | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for cand, eval_type, scores in rows:
        free_scores = (cand.get("free_evaluations") or {}).get(eval_type) or {}
        cost = frontier.cost_of(cand, eval_type)
        cells = [_score(scores, k) for k, _ in metrics] + [_score(free_scores, k) for k in free]
        cells += [_fmt(cost.get("usd_per_million_tokens")), _fmt(cost.get("tokens_per_second"))]
        lines.append(f"| {cand['model']} | {EVAL_NAMES[eval_type]} | " + " | ".join(cells) + " |")
    for cand in report["candidates"]:
        if cand.get("error"):
            lines.append(f"| {cand['model']} | failed: {cand['error']} |" + " |" * len(head))
    prod = report["production"]
    n = max((s.get("n") or 0 for _, _, s in rows), default=0)
    lines += ["", (f"n = {n} eval examples. Production (`{prod['model']}`): ${prod['usd_per_million_tokens']:.2f} "
                   f"per 1M tokens. Threshold for {report['workload_type']}: {report.get('threshold', '-')} "
                   "of production's score."), ""]
    return lines


def training_section(report: dict[str, Any]) -> list[str]:
    trained = [c for c in report["candidates"] if (c.get("training") or {}).get("steps")]
    if not trained:
        return []
    lines = ["## Training and privacy", "",
             "| model | privacy | epsilon | delta | noise | steps | time | val loss | public warm-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for cand in trained:
        t = cand["training"]
        private = t.get("epsilon") is not None
        warm = (f"{t['public_examples']} examples, {t['public_steps']} steps" if t.get("public_steps") else "none")
        lines.append(f"| {cand['model']} | {'DP-SGD, ' + str(t.get('clipping')) + ' clipping' if private else 'none'}"
                     f" | {_fmt(t.get('epsilon'), 2)} | {_fmt(t.get('delta'))} | {_fmt(t.get('noise_multiplier'), 2)}"
                     f" | {t['steps']} | {_fmt(t.get('seconds'), 0)} s | {_fmt(t.get('val_loss'))} | {warm} |")
    return [*lines, "", *_budget_lines(trained)]


def _budget_lines(trained: list[dict[str, Any]]) -> list[str]:
    """What each DP training left of the workload's privacy budget (per record: ray_app/privacy.py)."""
    out = []
    for cand in trained:
        b = cand["training"].get("privacy_budget")
        if b:
            limited = (f"; the whole split would have overspent it, so it trained on the {b['records']} records "
                       "no earlier run used" if b.get("limited_to_fresh") else "")
            out.append(f"- {cand['model']}: privacy budget {b['budget_epsilon']:g}: spent {b['spent']:.2f} before "
                       f"({b['runs']} earlier runs), {b['after']:.2f} after, {b['budget_epsilon'] - b['after']:.2f} "
                       f"left{limited}")
    return [*out, ""] if out else []


def comparison_lines(report: dict[str, Any]) -> list[str]:
    tools = any("function_name_accuracy" in s for _, _, s in _rows(report))
    out = []
    for cand in report["candidates"]:
        for name, test in (cand.get("comparisons") or {}).items():
            if not test:
                continue
            a, b = name.removesuffix("_args").split("_vs_")
            what = "whole call" if name.endswith("_args") else ("function name" if tools else "similarity")
            out.append(f"- {cand['model']}: {EVAL_NAMES[a]} vs {EVAL_NAMES[b]}, {what}: better on {test['wins']}, "
                       f"worse on {test['losses']}, same on {test['ties']}; p = {test['p_value']:.3g}")
    return ["## Paired comparisons", "", "Same eval examples, exact two-sided sign test.", "", *out, ""] if out else []


def markdown(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    lines = [f"# Flywheel report: {report['workload_id']} / {report['client_id']}", "",
             f"Job `{report['job_id']}`, {report['workload_type']} traffic.", "",
             *data_section(report), *scores_section(report), *training_section(report), *comparison_lines(report),
             *live_section(report),
             "## Recommendation", "",
             (f"**{rec['model']}** ({rec['eval_type']}{', sweep trial ' + rec['trial'] if rec.get('trial') else ''})"
              f": accuracy ratio {rec['accuracy_ratio']}, ${_fmt(rec.get('usd_per_million_tokens'))} per 1M tokens, "
              f"cost reduction {rec['cost_reduction']}." if rec["model"] else f"None: {rec['reason']}."), "",
             "## Promotion", "", _promotion_line(rec), "", "![accuracy](accuracy.png)", ""]
    if report.get("sweep"):
        lines += frontier.markdown(report["sweep"])
    return "\n".join(lines)


def live_section(report: dict[str, Any]) -> list[str]:
    """The model serving the workload while this job ran, measured on live traffic (the report's `live`)."""
    live = report.get("live")
    if not live:
        return []
    measured = "not measured yet" if live["agreement"] is None else (
        f"{live['agreement']:.2f} [{live['ci'][0]:.2f}, {live['ci'][1]:.2f}] over {live['n']} compared calls")
    return ["## Live", "",
            f"The gateway routes this workload to `{live['model']}` ({live['mode']}), trained by job "
            f"`{live['trained_by_job']}`: offline accuracy ratio {_fmt(live['offline_accuracy_ratio'], 2)}; live "
            f"agreement with production {measured}; error rate {live['error_rate']:.1%}, p99 "
            f"{_fmt(live['p99_ms'], 0)} ms, over its last {live['attempts']} calls (window {live['window']}).", ""]


def _promotion_line(rec: dict[str, Any]) -> str:
    decision = rec.get("policy_decision")
    if not isinstance(decision, dict):
        return f"Promoted: no ({decision})."
    verdict = "allow" if decision["allow"] else "deny"
    reasons = ", ".join(f"`{r}`" for r in decision.get("reasons") or []) or "none"
    review = " A human review is required first (slow lane)." if rec.get("review_required") else ""
    return (f"Promoted: **{'yes' if rec.get('promoted') else 'no'}**. Policy `{decision['rule']}`: {verdict}, "
            f"lane {decision.get('lane') or '-'}, reasons: {reasons}.{review}")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Left: each evaluation's scores with their 95% intervals and the threshold; right: its price
    per 1M tokens beside the production model's (log scale: they differ by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report)
    metrics = [(k, name) for k, name in METRICS[:3] if any(k in s for _, _, s in rows)]
    labels = [f"{c['model']}\n{EVAL_NAMES[t]}" for c, t, _ in rows]
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(rows), 4.2), width_ratios=[3, 2])
    width = 0.8 / max(1, len(metrics))
    for i, (key, name) in enumerate(metrics):
        values = [s.get(key) or 0.0 for _, _, s in rows]
        cis = [s.get(f"{key}_ci") or (v, v) for (_, _, s), v in zip(rows, values, strict=True)]
        err = [[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
               [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]
        bars = acc.bar([x + i * width for x in range(len(rows))], values, width, yerr=err, capsize=3, label=name,
                       hatch="//" if key == "function_args_accuracy" else None)
        acc.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    if report.get("threshold"):
        acc.axhline(report["threshold"], color="grey", linestyle="--", linewidth=1,
                    label=f"threshold {report['threshold']}")
    acc.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(rows))], labels, fontsize=8)
    acc.set_ylim(0, 1.1)
    acc.set_ylabel("score vs production answers (95% CI)")
    acc.set_title(f"{report['workload_id']} ({report['workload_type']}), n = "
                  f"{max((s.get('n') or 0 for _, _, s in rows), default=0)}", fontsize=9)
    acc.legend(fontsize=7, loc="upper left")
    usd = [frontier.cost_of(c, t).get("usd_per_million_tokens") or 0.0 for c, t, _ in rows]
    cost.bar(range(len(rows)), usd, color="tab:green")
    cost.axhline(report["production"]["usd_per_million_tokens"], color="tab:red", linestyle="--", linewidth=1,
                 label=f"production ${report['production']['usd_per_million_tokens']:.2f}")
    cost.set_yscale("log")
    cost.set_xticks(range(len(rows)), labels, fontsize=8)
    cost.set_ylabel("$ per 1M tokens (measured)")
    cost.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
