"""Scheduled and on-demand runs: a deployment of the build, served from this process.

A deployment stores its parameters on the Prefect server, so its flow takes the config as a *path*
(a string a schedule can hold), loads it and runs the same build flow as `longloom build`.

    longloom server                                   # Prefect API + UI with its SQLite database
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    longloom serve my.yaml --cron "0 3 * * *"         # register the deployment, run it on schedule
    prefect deployment run longloom-build-file/<run.name>   # and ad hoc, from anywhere
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.build import run
from pipeline.build import longloom_commit, rebuild_command
from pipeline.core.helpers import die_with_parent
from schemas.config import load_config, with_overrides

FLOW_NAME = "longloom-build-file"


@flow(name=FLOW_NAME, log_prints=True)
def build_from_file(config_path: str, output: str | None = None) -> dict[str, Any]:
    """Load a YAML config (and optionally redirect its output folder), then run the build flow."""
    cfg = load_config(config_path)
    if output:
        cfg = with_overrides(cfg, "output", dir=output)
    # what a card shows to rebuild it: not this machine's paths nor the deployment (issue 12.9)
    return run(cfg, command=rebuild_command(config_path, cfg.output.dir, longloom_commit()))


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


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def server_urls(host: str, port: int) -> tuple[str, str]:
    """(API URL for clients on this machine, API URL the UI in a browser calls) for `--host/--port`.

    Prefect's UI otherwise calls the default 127.0.0.1:4200 whatever port the server listens on. A
    wildcard host is not an address a browser can call: the UI gets this machine's name instead.
    """
    local = "127.0.0.1" if host in WILDCARD_HOSTS else host
    public = socket.getfqdn() if host in WILDCARD_HOSTS else host
    fmt = lambda h: f"[{h}]" if ":" in h else h  # noqa: E731 (IPv6 literals need brackets in URLs)
    return f"http://{fmt(local)}:{port}/api", f"http://{fmt(public)}:{port}/api"


def server_env(host: str, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the `prefect server` child: its own URLs, no telemetry."""
    api, ui_api = server_urls(host, port)
    env = dict(os.environ if base is None else base)
    env.update(PREFECT_API_URL=api, PREFECT_UI_API_URL=ui_api, DO_NOT_TRACK="1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(cmd: list[str], env: dict[str, str], grace: float = 20.0) -> int:
    """Run `cmd` as a child, forward SIGTERM/SIGINT/SIGHUP to it and wait for it to exit.

    The child leads its own process group, so anything it starts gets the signal too; if it has not
    exited `grace` seconds after a signal, the group is killed. Never returns while the child runs:
    a stopped `longloom server` leaves no server holding the port.
    """
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    deadline: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        if not deadline:
            deadline.append(time.monotonic() + grace)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child.poll() is None:  # an exception here (never expected): do not leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def start_server(host: str = "127.0.0.1", port: int = 4200) -> int:
    """Run the Prefect server and UI until stopped (SQLite database under PREFECT_HOME).

    SIGTERM, SIGHUP and Ctrl-C stop the server too, and this returns only once it has exited.
    """
    home = os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))
    api, ui_api = server_urls(host, port)
    print(
        f"Prefect server and UI on http://{host}:{port} (database: {home}/prefect.db; the UI calls {ui_api})\n"
        f"In other shells: export PREFECT_API_URL={api}"
        + (f" (on other machines: {ui_api})" if host in WILDCARD_HOSTS else ""),
        flush=True,
    )
    return supervise(server_command(host, port), server_env(host, port))
