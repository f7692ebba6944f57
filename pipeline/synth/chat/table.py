"""The output table of chat samples (nullable columns a writer leaves out are filled)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

# --- output tables --------------------------------------------------------------------------------------


def chat_table(records: Sequence[Mapping[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """A CHAT_SCHEMA table from dict records; nullable columns a record leaves out become null."""
    from schemas.records import CHAT_SCHEMA

    schema = schema or CHAT_SCHEMA
    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    for r in records:
        for f in schema:
            if f.name not in r and not f.nullable:
                raise ValueError(f"chat record {r.get('sample_id')!r} lacks required field {f.name!r}")
            cols[f.name].append(r.get(f.name))
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
