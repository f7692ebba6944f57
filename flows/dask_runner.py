"""Dask task runner whose workers report to the flow's Prefect API and start no server of their own.

prefect-dask ships each task with the client's settings, but a worker process also runs Prefect's
background services (the log and event workers), which read the process's own settings: a worker
without PREFECT_API_URL starts a temporary Prefect server of its own (~220 MB, orphaned when the
worker stops) and its task logs never reach the flow run. A worker plugin sets the flow's API URL in
every worker process, present and future, before a task runs there.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner

API_PLUGIN = "longloom-prefect-api"


def _set_api_url(url: str | None) -> None:
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # Prefect read the environment at import: read it again
        sys.modules["prefect.context"].refresh_global_settings_context()


class PrefectApiPlugin(WorkerPlugin):
    """Points a Dask worker process at the flow's Prefect API before it runs any task.

    Without it a worker with no PREFECT_API_URL of its own starts a temporary Prefect server
    (~220 MB, orphaned when the worker stops) and sends its task logs there, not to the flow run.
    """

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.previous: str | None = None

    def setup(self, worker: Any) -> None:
        self.previous = os.environ.get("PREFECT_API_URL")
        _set_api_url(self.api_url)

    def teardown(self, worker: Any) -> None:
        _set_api_url(self.previous)


class ReportingDaskTaskRunner(DaskTaskRunner):
    """`DaskTaskRunner` that installs `PrefectApiPlugin(api_url)` on its cluster when it connects."""

    def __init__(self, *args: Any, api_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.api_url = api_url

    def duplicate(self) -> ReportingDaskTaskRunner:
        runner = super().duplicate()  # type(self)(...) without api_url
        runner.api_url = self.api_url
        return runner

    @property
    def client(self) -> Any:
        fresh = self._client is None
        client = DaskTaskRunner.client.fget(self)  # type: ignore[attr-defined]
        if fresh and self.api_url:
            client.register_plugin(PrefectApiPlugin(self.api_url), name=API_PLUGIN)
        return client
