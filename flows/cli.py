"""`longloom`: the command line. Each command is a few lines that load a config and call a flow or a library function."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import flows
from schemas.errors import ConfigError

if TYPE_CHECKING:
    from schemas.config import BuildConfig


def _load(path: str | None, output: str | None) -> BuildConfig:
    from schemas.config import load_config, with_overrides

    cfg = load_config(path or flows.DEFAULT_CONFIG)
    if not output:
        return cfg
    # --output names the folder, even when it is the default one: consent to replace what is there
    return with_overrides(cfg, "output", dir=output).model_copy(update={"output_named": True})


def cmd_build(args: argparse.Namespace) -> int:
    if not args.no_prefect:
        from flows import warm
        from flows.api import api_configured, server_mode

        if warm.enabled() and not api_configured() and server_mode(args.prefect_server) == "keep":
            # a child of the warm build process (Prefect imported) runs it, config checks included
            handed = warm.hand_over(args.argv)
            if handed is not None:
                return handed
    from schemas.config import with_overrides

    cfg = _load(args.config, args.output)
    runner = "dask" if args.dask_address else args.runner
    cfg = with_overrides(cfg, "run", task_runner=runner, dask_address=args.dask_address, workers=args.workers)

    from pipeline.build import longloom_commit, rebuild_command

    command = rebuild_command(args.config, cfg.output.dir, longloom_commit())  # no local paths in cards

    from pipeline.core.progress import BarReporter, use_reporter

    if args.no_prefect:  # never imports Prefect (saves ~1.5 s of start-up)
        from pipeline.build import run_stages

        # on a terminal the bars show progress; elsewhere (CI, a log file) one line per finished unit
        level = logging.WARNING if sys.stderr.isatty() else logging.INFO
        logging.basicConfig(level=level, format="%(asctime)s %(message)s")
        prefetch_tokenizer(cfg)
        with use_reporter(BarReporter()) as bars:
            done = run_stages(cfg, command=command, reporter=bars)
        manifest = done["finalize"]
        from pipeline.core.storage import output_path  # a URL output: this process's mirror of it

        print((output_path(cfg.output.dir) / "report.md").read_text(encoding="utf-8"))
        published = done.get("publish")  # the publish stage runs only when every check passed
        if published:
            print("\n".join(published["plan"]))
        return 0 if manifest.ok else 1
    from flows.api import api_server, limit_malloc_arenas
    from pipeline.build import preflight

    limit_malloc_arenas()  # before any task thread starts: the flow process's RSS (issue 19.2)

    # The Prefect server starts first (or an earlier build's kept server is found), then the same
    # checks as `longloom validate` and the imports of Prefect overlap its start-up; a config or input
    # error still shows in seconds. The flow waits for the server and repeats the checks.
    from flows.early import early_start

    with api_server(args.prefect_server):
        shards = preflight(cfg)
        prefetch_tokenizer(cfg)  # its seconds overlap the imports below and the wait for the server
        # the first stage's units start now, on threads; the flow adopts them as its task runs
        with use_reporter(BarReporter()), early_start(cfg, command, shards):
            from flows.build import run as run_flow

            result = run_flow(cfg, command=command)  # the flow logs the report itself
    print(json.dumps(result, indent=2))
    return 0 if result["checks_ok"] else 1


def prefetch_tokenizer(cfg: BuildConfig) -> None:
    """Start building the tokenizer in the background when this process will tokenize (threads or
    in-process; Dask workers build their own). A tokenizer that cannot load is left to preflight's error."""
    if cfg.run.task_runner == "dask":
        return
    import contextlib

    from pipeline.core.tokenizer import TokenizerError, tokenizer_for

    with contextlib.suppress(TokenizerError):
        tokenizer_for(cfg).prefetch()


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.build import preflight

    cfg = _load(args.config, None)
    shards = preflight(cfg)
    print(
        f"{args.config or flows.DEFAULT_CONFIG}: valid; {len(shards)} input shards from {len(cfg.sources)} sources"
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.stages.finalize import GcError, collect_garbage

    try:
        report = collect_garbage(Path(args.output_dir), delete=args.delete)
    except GcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{Path(args.output_dir) / '.longloom'}:")
    print("\n".join(report.lines()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import FLOW_NAME, serve

    if not args.cron and not args.interval:
        raise ConfigError("serve: give a schedule, --cron '0 3 * * *' or --interval SECONDS")
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "note: PREFECT_API_URL is not set, so the deployment lives in a temporary local API that ends "
            "with this process; start `longloom server` and export PREFECT_API_URL to keep it and see it in the UI",
            file=sys.stderr,
        )
    cfg = _load(args.config, None)
    print(
        f"serving {FLOW_NAME}/{args.name or cfg.run.name}; trigger a run now with: "
        f"prefect deployment run '{FLOW_NAME}/{args.name or cfg.run.name}'",
        flush=True,
    )
    serve(args.config, cron=args.cron, interval=args.interval, name=args.name, output=args.output)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    if args.action in ("stop", "status"):
        from flows.api import kept_server, stop_kept

        if args.action == "stop":
            from flows import warm

            stopped = warm.stop()  # first: it would end on its own within seconds of the server
            print(stop_kept())
            if stopped:
                print(stopped)
            return 0
        found = kept_server()
        print(f"running at {found.url} (pid {found.pid}; log {found.log})" if found else "not running")
        from flows import warm

        line = warm.status()
        if found and line:
            print(line)
        return 0 if found else 1
    from flows.deploy import start_server

    return start_server(args.host, args.port)


def cmd_warm_process(args: argparse.Namespace) -> int:
    from flows import warm

    warm.serve(args.home, "\0" + args.address, main)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from flows import cluster

    if args.action == "local":
        return cluster.run_local(args.workers, args.port)
    if not args.dask_address:
        raise ConfigError("cluster check: give the scheduler, --dask-address tcp://HOST:8786")
    output = args.output or (_load(args.config, None).output.dir if args.config else None)
    rep = cluster.check(args.dask_address, output, os.environ.get("PREFECT_API_URL"))
    print("\n".join(rep.lines))
    for line in rep.problems:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if rep.problems else 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.synth.procedural.score import (
        load_eval,
        read_predictions,
        reference_predictions,
        score_table,
    )

    try:
        table = load_eval(args.eval, args.config)
        preds = (
            reference_predictions(table)
            if args.predictions is None
            else read_predictions(args.predictions, table)
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = score_table(table, preds).as_dict()
    print(json.dumps(report, indent=2))
    return 0


def cmd_export_eval(args: argparse.Namespace) -> int:
    from pipeline.synth.procedural.export import export_eval
    from pipeline.synth.procedural.score import load_eval

    dest = Path(args.dest) if args.dest else Path(args.eval) / "eval_export" / args.format
    try:
        table = load_eval(args.eval, args.config)
        files = export_eval(table, dest, args.format, name=f"longloom_{args.config}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"format": args.format, "rows": table.num_rows, "files": [str(f) for f in files]}, indent=2
        )
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.config import BuildConfig

    print(json.dumps(BuildConfig.model_json_schema(), indent=2))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.output.card import CardError, write_card

    try:
        card = write_card(Path(args.output_dir), include_audit=args.include_audit)
    except CardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = [c for c in card.checks if not c.ok]
    print(
        f"wrote {card.path} and {len(card.plots)} images; {len(card.checks) - len(bad)}/{len(card.checks)} recounts agree"
    )
    for c in bad:
        print(f"  FAILED {c.name}: {c.detail}", file=sys.stderr)
    return 0 if not bad else 1


def cmd_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.output.card import CardError, load_manifest
    from pipeline.output.publish import PublishError, publish

    out = Path(args.output_dir)
    try:
        repo_id = args.repo_id or (load_manifest(out).config.get("publish") or {}).get("repo_id")
        if not repo_id:
            raise PublishError("no repo: pass --repo-id ORG/NAME (or set publish.repo_id in the config)")
        res = publish(
            out,
            repo_id,
            private=args.private,
            revision=args.revision,
            dry_run=args.dry_run,
            delete_stale=not args.keep_stale,
            allow_failed_checks=args.allow_failed_checks,
            include_audit=args.include_audit,
        )
    except (CardError, PublishError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(res.plan.lines()))
    if res.dry_run:
        print("dry run: nothing uploaded")
    elif res.commit:
        print(f"committed {res.commit}: {res.url}")
    else:
        print("nothing changed: no commit")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.output.export import ExportError, export

    out = Path(args.output_dir)
    dest = Path(args.to) if args.to else out / "exports" / args.format
    try:
        res = export(
            out,
            dest,
            args.format,
            configs=args.config,
            with_boundaries=args.with_boundaries,
            mds_python=args.mds_python,
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(res.lines()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longloom",
        description="Long-context dataset construction: pack corpora to exact token lengths with lineage.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="run the build flow (the bundled sample config if CONFIG is omitted)")
    b.add_argument("config", nargs="?", help="YAML config; default: the bundled data/sample.yaml")
    b.add_argument("--output", help="override output.dir")
    b.add_argument("--runner", choices=["threads", "dask"], help="override run.task_runner")
    b.add_argument("--dask-address", help="run on an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    b.add_argument("--workers", type=int, help="override run.workers")
    b.add_argument("--no-prefect", action="store_true", help="run the stages in-process without Prefect")
    b.add_argument(
        "--prefect-server",
        choices=["keep", "temporary"],
        help="without PREFECT_API_URL: keep a local server running for later builds and the UI (stop it "
        "with `longloom server stop`), or start one for this build only; default: "
        "$LONGLOOM_PREFECT_SERVER, else keep at a terminal and temporary elsewhere",
    )
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("validate", help="check a config and its inputs without running anything")
    v.add_argument("config", nargs="?")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser(
        "card", help="(re)write OUTPUT_DIR/README.md, the dataset card, from the manifest and rows"
    )
    c.add_argument("output_dir")
    c.add_argument(
        "--include-audit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="list the audit tables as configs (default: the run's publish.include_audit)",
    )
    c.set_defaults(func=cmd_card)

    pub = sub.add_parser(
        "publish",
        help="upload OUTPUT_DIR to a Hugging Face-compatible hub (HF_ENDPOINT; token from HF_TOKEN)",
    )
    pub.add_argument("output_dir")
    pub.add_argument("--repo-id", help="ORG/NAME of the dataset repo; default: publish.repo_id of the run")
    pub.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    pub.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    pub.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded or deleted; change nothing"
    )
    pub.add_argument(
        "--keep-stale", action="store_true", help="do not delete hub files this run did not write"
    )
    pub.add_argument(
        "--allow-failed-checks", action="store_true", help="publish even if reconciliation failed"
    )
    pub.add_argument(
        "--include-audit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="upload the audit tables (audit/quarantine holds raw input bytes); "
        "default: the run's publish.include_audit",
    )
    pub.set_defaults(func=cmd_publish)

    ex = sub.add_parser(
        "export",
        help="write OUTPUT_DIR's configs in a trainer's format (megatron: .bin/.idx via megatron-core; mds: "
        "MosaicML shards via mosaicml-streaming), with a Parquet sidecar of each row's lineage keyed by "
        "sequence index",
    )
    ex.add_argument("output_dir", help="a finished build's output folder")
    ex.add_argument("--format", required=True, choices=["megatron", "mds"])
    ex.add_argument(
        "--mds-python",
        help="for --format mds: the Python of an environment with mosaicml-streaming (e.g. llm-foundry's), "
        "which writes the shards (default: $LONGLOOM_MDS_PYTHON, else this one)",
    )
    ex.add_argument("--to", help="destination folder (default: OUTPUT_DIR/exports/FORMAT); replaced whole")
    ex.add_argument(
        "--config",
        action="append",
        help="export only this config (repeatable; default: every config with ids)",
    )
    ex.add_argument(
        "--with-boundaries",
        action="store_true",
        help="add cu_seqlens and position_ids (restarting at each document) to the sidecar, from segments",
    )
    ex.set_defaults(func=cmd_export)

    g = sub.add_parser(
        "gc",
        help="list (and with --delete remove) intermediates under OUTPUT_DIR/.longloom that no current "
        "stage key uses, with their sizes; a finished build removes them itself",
    )
    g.add_argument("output_dir")
    g.add_argument("--delete", action="store_true", help="remove them (default: dry run, report only)")
    g.set_defaults(func=cmd_gc)

    d = sub.add_parser(
        "serve", help="register a scheduled deployment of the build for CONFIG and run it until stopped"
    )
    d.add_argument("config", help="YAML config (stored as an absolute path in the deployment)")
    d.add_argument("--cron", help="cron schedule, e.g. '0 3 * * *' for 03:00 every night")
    d.add_argument("--interval", type=float, help="or: run every this many seconds")
    d.add_argument("--name", help="deployment name; default: run.name from the config")
    d.add_argument("--output", help="override output.dir")
    d.set_defaults(func=cmd_serve)

    srv = sub.add_parser(
        "server",
        help="run the local Prefect server and UI (SQLite database) until stopped; `server stop` stops "
        "the one builds keep running, `server status` shows it",
    )
    srv.add_argument("action", nargs="?", choices=["run", "stop", "status"], default="run")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=4200)
    srv.set_defaults(func=cmd_server)

    wp = sub.add_parser(
        "warm-process",
        help="(started by `longloom build` in keep mode) the process builds fork from; see flows/warm.py",
    )
    wp.add_argument("home", type=Path)
    wp.add_argument("address")
    wp.set_defaults(func=cmd_warm_process)

    cl = sub.add_parser(
        "cluster",
        help="`cluster check`: run a probe on every Dask worker (same Longloom and packages, Prefect API "
        "reachable, store writable, scratch space); `cluster local`: start a scheduler and workers here",
    )
    cl.add_argument("action", choices=["check", "local"])
    cl.add_argument("config", nargs="?", help="check: the config whose output.dir to probe")
    cl.add_argument("--dask-address", help="check: the scheduler, e.g. tcp://10.0.0.5:8786")
    cl.add_argument("--output", help="check: the output folder to probe (overrides the config's)")
    cl.add_argument("--workers", type=int, default=2, help="local: how many workers (default 2)")
    cl.add_argument("--port", type=int, help="local: the scheduler's port (default: a free one)")
    cl.set_defaults(func=cmd_cluster)

    sc = sub.add_parser("score", help="grade model answers against a procedural evaluation export")
    sc.add_argument("eval", help="output folder of a run (or the eval Parquet files)")
    sc.add_argument(
        "predictions",
        nargs="?",
        help='JSONL of {"eval_id", "prediction"}, RULER prediction JSONL or lm-eval samples_*.jsonl '
        "(a file or a folder); omitted: grade the references",
    )
    sc.add_argument("--config", default="procedural_eval", help="eval config name in the output folder")
    sc.set_defaults(func=cmd_score)

    ex = sub.add_parser(
        "export-eval", help="write the evaluation rows as RULER JSONL or an lm-evaluation-harness task"
    )
    ex.add_argument("eval", help="output folder of a run (or the eval Parquet files)")
    ex.add_argument("dest", nargs="?", help="folder to write; default: <eval>/eval_export/<format>")
    ex.add_argument("--format", choices=["ruler", "lm-eval"], required=True)
    ex.add_argument("--config", default="procedural_eval", help="eval config name in the output folder")
    ex.set_defaults(func=cmd_export_eval)

    s = sub.add_parser(
        "schema", help="print the config schema (every field, type, default and allowed value)"
    )
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # as given: a build hands them on (flows.warm)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # a full disk: one line that says what to do, not a traceback from deep inside a writer.
        # (A DiskFullError means pipeline.core.parquet_io was imported; `--help` never pays for importing it.)
        io = sys.modules.get("pipeline.core.parquet_io")
        if io is not None and isinstance(err, io.DiskFullError):
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise
    finally:
        if argv is None:  # the process's own command line (`longloom ...`): the process ends now
            # Interpreter shutdown runs one last full garbage collection over every object still
            # alive (after a Prefect build: its and pydantic's modules and models; 0.5 s quiet, ~4 s
            # measured under load). Frozen objects are skipped; the process's exit frees them all the
            # same, and atexit handlers (Prefect's log and event flushes) still run before it.
            gc.freeze()


if __name__ == "__main__":
    raise SystemExit(main())
