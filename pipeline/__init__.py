"""Longloom: long-context dataset construction with provenance. Plain Python; runs without Prefect."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("longloom")
except PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0.0.0+source"
