"""The Prefect API a build reports to, and the processes Longloom starts for it.

`longloom build` needs nothing started by hand: without `PREFECT_API_URL` it starts Prefect's
temporary local API (a uvicorn subprocess) itself, shows that it is waiting for it, and runs the
flow with that URL set explicitly. Explicit matters for Dask: the URL travels with every task's
settings and is set in every worker process by a worker plugin, so workers report to the flow's
API (their task logs reach the flow run) instead of each starting a temporary server of its own.

A `kill -9` of the build leaves that temporary server orphaned. Its pid is recorded under the run's
lock (`.longloom/helpers/`), and the next run on the same output folder ends it before starting.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.helpers import forget_helpers, reap_orphans, record_helpers
from pipeline.core.progress import waiting


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it here (environment, profile, or a test harness)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def prefect_api() -> Iterator[tuple[str, int | None]]:
    """Yield (API URL, pid of the temporary server or None) for runs started inside the block.

    A configured PREFECT_API_URL is used as it is. Otherwise Prefect's temporary server is started
    here (progress shown while it comes up: 20-70 s under load when its database is new) and set as
    PREFECT_API_URL for the block, for this process's clients and for everything the flow ships out.
    """
    url = configured_api_url()
    if url:
        yield url, None
        return
    from prefect.context import refresh_global_settings_context
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    with waiting("starting Prefect's temporary API (a new database takes up to a minute or more)"):
        server.start()
    assert server.server_process is not None
    previous = os.environ.get("PREFECT_API_URL")
    try:
        # the settings context covers this thread and what is shipped to task runners; the
        # environment covers Prefect's background threads (log and event workers) in this process
        os.environ["PREFECT_API_URL"] = server.api_url
        refresh_global_settings_context()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url, server.server_process.pid
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # send the last logs and events while the server still listens (else: "Error logging to API"
        # and a minute of connection retries at exit)
        with waiting("sending the last logs to Prefect's temporary API"):
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        refresh_global_settings_context()
        server.stop()


def temporary_server_pids() -> list[int]:
    """Pids of Prefect temporary servers this process started (by `prefect_api` or Prefect itself)."""
    module = sys.modules.get("prefect.server.api.server")
    if module is None:
        return []
    servers = list(module.SubprocessASGIServer._instances.values())
    return [s.server_process.pid for s in servers if s.running and s.server_process is not None]


@contextlib.contextmanager
def run_helpers(work_root: Path, log: Callable[[str], Any]) -> Iterator[None]:
    """Inside the run's lock: end what killed runs left, record this run's temporary server."""
    reap_orphans(work_root, log)
    record = record_helpers(work_root, temporary_server_pids())
    try:
        yield
    finally:
        forget_helpers(record)
