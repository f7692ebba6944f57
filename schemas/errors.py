"""The error a bad configuration raises, apart from the config models so that a command can catch it
without importing them (pydantic, pyarrow: ~0.4 s that `longloom build` handing its run to the warm
build process does not need)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML."""
