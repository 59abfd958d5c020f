"""`flywheel`: the command line. Settings are loaded here, once, and passed down.

serve/train/evals are reached through plugins (entry points), never imported, so the
core keeps its one direction of imports.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ray_app.config import Settings, load_settings
from ray_app.errors import FlywheelError
from ray_app.plugins import load_plugin


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings(getattr(args, "config", None))
        return args.handler(settings, args) or 0
    except FlywheelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="A governed, Ray-native LLM data flywheel.")
    sub = p.add_subparsers(title="commands")

    s = sub.add_parser("serve", help="start (or join) Ray and deploy the Serve app; blocks")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--config", help="YAML settings file (default: $FLYWHEEL_CONFIG)")
    s.set_defaults(handler=_serve)

    r = sub.add_parser("run", help="run one flywheel job to the end (what `ray job submit` calls)")
    r.add_argument("--workload-id", required=True)
    r.add_argument("--client-id", required=True)
    r.add_argument("--config", help="YAML settings file (default: $FLYWHEEL_CONFIG)")
    r.add_argument("--out", help="report folder (default: DATA_DIR/reports/JOB_ID)")
    r.add_argument("--job-id", help="run (or resume) this existing job instead of creating one")
    r.set_defaults(handler=_run)

    ld = sub.add_parser("load", help="bulk-load log records from a JSONL file")
    ld.add_argument("file")
    ld.add_argument("--workload-id", help="for lines that carry none (plain messages lines)")
    ld.add_argument("--client-id", help="for lines that carry none (plain messages lines)")
    ld.add_argument("--batch-size", type=int, default=1000)
    ld.add_argument("--config")
    ld.set_defaults(handler=_load)

    sim = sub.add_parser("simulate", help="post simulated production traffic to a running app")
    sim.add_argument("--url", default="http://127.0.0.1:8000")
    sim.add_argument("--api-key", required=True)
    sim.add_argument("--records", type=int, default=300, help="records per service")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--config")
    sim.set_defaults(handler=_simulate)
    _operator_commands(sub)
    return p


def _operator_commands(sub: argparse._SubParsersAction) -> None:
    """keys, audit, privacy, models, deploy: what operators and auditors run against the stores."""
    k = sub.add_parser("keys", help="API keys").add_subparsers(title="keys commands")
    kc = k.add_parser("create", help="print a new API key once")
    kc.add_argument("--role", required=True, choices=["admin", "ingest", "operator", "auditor"])
    kc.add_argument("--name", default="")
    kc.add_argument("--config")
    kc.set_defaults(handler=_keys_create)

    au = sub.add_parser("audit", help="the hash-chained audit trail").add_subparsers(title="audit commands")
    av = au.add_parser("verify", help="check the chain end to end; non-zero naming the first bad entry")
    av.add_argument("--config")
    av.set_defaults(handler=_audit_verify)

    pv = sub.add_parser("privacy", help="differential-privacy ledgers").add_subparsers(title="privacy commands")
    ps = pv.add_parser("show", help="epsilon spent (RDP-composed over every DP training) per workload")
    ps.add_argument("--workload-id", help="only this workload's ledgers")
    ps.add_argument("--client-id", help="only this client's ledgers")
    ps.add_argument("--config")
    ps.set_defaults(handler=_privacy_show)

    md = sub.add_parser("models", help="the model registry").add_subparsers(title="models commands")
    ml = md.add_parser("list", help="registered models, their state and offline scores")
    ml.add_argument("--workload-id")
    ml.add_argument("--config")
    ml.set_defaults(handler=_models_list)
    ms = md.add_parser("show", help="one model's whole entry (JSON)")
    ms.add_argument("model_id")
    ms.add_argument("--config")
    ms.set_defaults(handler=_models_show)

    dp = sub.add_parser("deploy", help="route a workload's calls to a model through the running app's gateway")
    dp.add_argument("target", help="a model id, or a job id (its recommended model, else its best customized one)")
    dp.add_argument("--mode", required=True, choices=["off", "shadow", "canary", "live"])
    dp.add_argument("--weight", type=float, default=0.0, help="canary: share of calls the model answers")
    dp.add_argument("--url", default="http://127.0.0.1:8000")
    dp.add_argument("--api-key", help="an operator or admin key (default: the settings' admin_key)")
    dp.add_argument("--config")
    dp.set_defaults(handler=_deploy)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    load_plugin("serve")(settings, host=args.host, port=args.port)
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    report = load_plugin("run")(settings, workload_id=args.workload_id, client_id=args.client_id,
                                job_id=args.job_id, out_dir=args.out)
    rec = report.get("recommendation") or {}
    print(f"job {report['job_id']}: recommendation {rec.get('model') or 'none'} "
          f"({rec.get('reason') or rec.get('eval_type')}); report in {report.get('report_dir')}")
    return 0


def _load(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app.loader import load_jsonl

    stats = load_jsonl(settings, args.file, workload_id=args.workload_id, client_id=args.client_id,
                       batch_size=args.batch_size)
    print(f"loaded {stats.stored} new records ({stats.duplicates} duplicates, {stats.rejected} rejected lines)")
    for line_no, reason in stats.first_errors:
        print(f"  line {line_no}: {reason}", file=sys.stderr)
    return 1 if stats.rejected else 0


def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app.auth import create_key
    from ray_app.storage import open_job_store

    print(create_key(open_job_store(settings), role=args.role, name=args.name))
    return 0


def _audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app.governance.audit import verify
    from ray_app.storage import open_audit_store

    result = verify(open_audit_store(settings))
    if result.ok:
        print(f"audit chain intact: {result.entries} entries")
        return 0
    print(f"audit chain broken at entry {result.first_bad_seq}: {result.reason}", file=sys.stderr)
    return 1


def _privacy_show(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app import privacy
    from ray_app.storage import open_job_store

    store = open_job_store(settings)
    dp = settings.training.privacy
    keys = [(w, c) for w, c in privacy.ledger_keys(store)
            if args.workload_id in (None, w) and args.client_id in (None, c)]
    if args.workload_id and args.client_id and not keys:
        keys = [(args.workload_id, args.client_id)]  # say so explicitly: nothing spent yet
    if not keys:
        print("no DP trainings recorded")
        return 0
    for workload_id, client_id in keys:
        ledger = privacy.read_ledger(store, workload_id, client_id)
        info = privacy.summary(ledger, privacy.record_sets(store, ledger), delta=dp.delta,
                               budget_epsilon=dp.budget_epsilon)
        budget = ("no budget set (training.privacy.budget_epsilon)" if info["budget_remaining"] is None else
                  f"budget {info['budget_epsilon']:g}, remaining {info['budget_remaining']:.3f}")
        print(f"{workload_id}/{client_id}: {info['runs']} DP runs, epsilon spent {info['epsilon_spent']:.3f} "
              f"at delta {info['delta']:g}; {budget}")
        if args.workload_id and args.client_id:
            for run in ledger["runs"]:
                used = f", {run['num_records']} records" if run.get("records") else ", records not named (all)"
                print(f"  job {run['job_id']} {run['model']}: noise {run['noise_multiplier']:.4f}, "
                      f"sample rate {run['sample_rate']:.4f}, {run['steps']} steps{used}")
    return 0


def _models_list(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app.registry import list_models
    from ray_app.storage import open_job_store

    models = list_models(open_job_store(settings), workload_id=args.workload_id)
    if not models:
        print("no registered models (a job registers each customized candidate it trains)")
    for m in models:
        ratio = m.get("accuracy_ratio")
        print(f"{m['id']}  {m['state']:<11} {m['workload_id']}/{m['client_id']}  accuracy "
              f"{'-' if ratio is None else f'{ratio:.3f}'}  epsilon {m['privacy'].get('epsilon')}")
    return 0


def _models_show(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from ray_app.registry import get_model
    from ray_app.storage import open_job_store

    print(json.dumps(get_model(open_job_store(settings), args.model_id), indent=1))
    return 0


def _deploy(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from ray_app.registry import model_for_target
    from ray_app.storage import open_job_store

    model = model_for_target(open_job_store(settings), args.target)
    body = {"workload_id": model["workload_id"], "client_id": model["client_id"], "model": model["id"],
            "mode": args.mode, "weight": args.weight}
    key = args.api_key or settings.admin_key
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/v1/routes", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {key}"} if key else {})
    except httpx.HTTPError as exc:
        raise FlywheelError(f"cannot reach the app at {args.url}: {exc!r:.160} (is `flywheel serve` running?)") from exc
    if response.status_code != 200:
        print(f"error: {response.status_code} {response.text[:400]}", file=sys.stderr)
        return 1
    print(f"{model['id']} now {args.mode} for {model['workload_id']}/{model['client_id']}"
          + (f" (weight {args.weight:g})" if args.mode == "canary" else ""))
    return 0


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from ray_app.traffic import post_simulated_traffic

    counts = post_simulated_traffic(args.url, api_key=args.api_key, per_service=args.records, seed=args.seed)
    for service, n in counts.items():
        print(f"{service}: {n} records posted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
