"""Test-only crash injection for the resume tests. Never set LONGLOOM_FAULT in a real run.

`LONGLOOM_FAULT="<point>:<n>"` makes this process SIGKILL itself the n-th time it passes `<point>`:
a real, unannounced death (no cleanup, no finally blocks), at a place a test can name.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_passes: Counter[str] = Counter()
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here by SIGKILL if LONGLOOM_FAULT names this point and pass count; otherwise nothing."""
    spec = os.environ.get("LONGLOOM_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    with _lock:
        _passes[name] += 1
        hit = _passes[name] == int(nth or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
