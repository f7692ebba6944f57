"""Prefect flows and the `longloom` command line: thin wiring around `pipeline`.

Importing this package sets Prefect defaults that make a first run on an offline machine work with
nothing started by hand (an ephemeral local API, no telemetry); explicit settings still win.
"""

from __future__ import annotations

import os
from pathlib import Path

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the client's own switch: without it Prefect prints a telemetry notice on a terminal
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "longloom",
}.items():
    os.environ.setdefault(_key, _value)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "sample.yaml"
