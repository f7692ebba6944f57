"""`longloom`: the command line. Each command is a few lines that load a config and call a flow or a library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import flows
from schemas.config import BuildConfig, ConfigError, load_config, with_overrides


def _load(path: str | None, output: str | None) -> BuildConfig:
    cfg = load_config(path or flows.DEFAULT_CONFIG)
    return with_overrides(cfg, "output", dir=output) if output else cfg


def cmd_build(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.output)
    runner = "dask" if args.dask_address else args.runner
    cfg = with_overrides(cfg, "run", task_runner=runner, dask_address=args.dask_address, workers=args.workers)
    command = "longloom build " + " ".join(sys.argv[2:])
    if args.no_prefect:
        from flows.build import summary_lines
        from pipeline.build import run_build

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        manifest = run_build(cfg, command=command)
        print("\n".join(summary_lines(manifest)))
        return 0 if manifest.ok else 1
    from flows.build import run as run_flow

    result = run_flow(cfg, command=command)
    print(json.dumps(result, indent=2))
    return 0 if result["checks_ok"] else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.build import preflight

    cfg = _load(args.config, None)
    shards = preflight(cfg)
    print(
        f"{args.config or flows.DEFAULT_CONFIG}: valid; {len(shards)} input shards from {len(cfg.sources)} sources"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.procedural.score import load_eval, read_predictions, reference_predictions, score_table

    try:
        table = load_eval(args.eval, args.config)
        preds = (
            reference_predictions(table) if args.predictions is None else read_predictions(args.predictions)
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = score_table(table, preds).as_dict()
    print(json.dumps(report, indent=2))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(BuildConfig.model_json_schema(), indent=2))
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
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("validate", help="check a config and its inputs without running anything")
    v.add_argument("config", nargs="?")
    v.set_defaults(func=cmd_validate)

    sc = sub.add_parser("score", help="grade model answers against a procedural evaluation export")
    sc.add_argument("eval", help="output folder of a run (or the eval Parquet files)")
    sc.add_argument(
        "predictions", nargs="?", help='JSONL of {"eval_id", "prediction"}; omitted: grade the references'
    )
    sc.add_argument("--config", default="procedural_eval", help="eval config name in the output folder")
    sc.set_defaults(func=cmd_score)

    s = sub.add_parser(
        "schema", help="print the config schema (every field, type, default and allowed value)"
    )
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
