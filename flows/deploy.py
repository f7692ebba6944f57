"""Scheduled and on-demand runs: a deployment of the build, served from this process.

A deployment stores its parameters on the Prefect server, so its flow takes the config as a *path*
(a string a schedule can hold), loads it and runs the same build flow as `longloom build`.

    longloom server                                   # Prefect API + UI with its SQLite database
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    longloom serve my.yaml --cron "0 3 * * *"         # register the deployment, run it on schedule
    prefect deployment run longloom-build-file/<run.name>   # and ad hoc, from anywhere
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.build import run
from schemas.config import load_config, with_overrides

FLOW_NAME = "longloom-build-file"


@flow(name=FLOW_NAME, log_prints=True)
def build_from_file(config_path: str, output: str | None = None) -> dict[str, Any]:
    """Load a YAML config (and optionally redirect its output folder), then run the build flow."""
    cfg = load_config(config_path)
    if output:
        cfg = with_overrides(cfg, "output", dir=output)
    return run(
        cfg, command=f"deployment {FLOW_NAME} {config_path}" + (f" --output {output}" if output else "")
    )


def deployment_parameters(config_path: str, output: str | None) -> dict[str, str]:
    """Absolute paths: scheduled runs start in their own processes, maybe in another folder."""
    params = {"config_path": str(Path(config_path).resolve())}
    if output:
        params["output"] = str(Path(output).resolve())
    return params


def serve(
    config_path: str,
    cron: str | None = None,
    interval: float | None = None,
    name: str | None = None,
    output: str | None = None,
) -> None:
    """Register a deployment of `build_from_file` for this config and run its flow runs until stopped."""
    from prefect.deployments.runner import EntrypointType

    cfg = load_config(config_path)  # a bad config fails here, before anything is registered
    if not output and not Path(cfg.output.dir).is_absolute():
        output = cfg.output.dir  # pinned to where `serve` was started, not where a run happens to start
    build_from_file.serve(
        name=name or cfg.run.name,
        cron=cron,
        interval=interval,
        parameters=deployment_parameters(config_path, output),
        description=f"Longloom build of {Path(config_path).resolve()}",
        tags=["longloom"],
        # runs import the flow by module path: works from an installed package and from a checkout
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def start_server(host: str = "127.0.0.1", port: int = 4200) -> int:
    """Run the Prefect server and UI in the foreground (SQLite database under PREFECT_HOME)."""
    home = os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))
    print(
        f"Prefect server and UI on http://{host}:{port} (database: {home}/prefect.db)\n"
        f"In other shells: export PREFECT_API_URL=http://{host}:{port}/api",
        flush=True,
    )
    return subprocess.call(server_command(host, port))
