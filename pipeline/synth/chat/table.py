"""The output table of chat samples (nullable columns a writer leaves out are filled)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# --- output tables --------------------------------------------------------------------------------------


def final_answer_mask(mask: np.ndarray) -> np.ndarray:
    """An all-assistant-turns loss mask reduced to its last run of ones (the final assistant turn)."""
    m = np.asarray(mask, np.int8)
    ones = np.flatnonzero(m)
    if not len(ones):
        return m
    gaps = np.flatnonzero(np.diff(ones) > 1)
    first = int(ones[gaps[-1] + 1]) if len(gaps) else int(ones[0])
    out = np.zeros_like(m)
    out[first : int(ones[-1]) + 1] = 1
    return out


def chat_table(
    records: Sequence[Mapping[str, Any]],
    schema: pa.Schema | None = None,
    loss_mask: str = "all_assistant_turns",
) -> pa.Table:
    """A CHAT_SCHEMA table from dict records; nullable columns a record leaves out become null.

    A record's `loss_mask` marks every assistant turn (`RenderedChat.loss_mask`); with `loss_mask=
    "final_answer"` (`output.loss_mask`) only the last assistant turn stays marked.
    """
    from schemas.records import CHAT_SCHEMA

    if loss_mask not in ("all_assistant_turns", "final_answer"):
        raise ValueError(f"loss_mask must be all_assistant_turns or final_answer, got {loss_mask!r}")
    schema = schema or CHAT_SCHEMA
    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    for r in records:
        for f in schema:
            if f.name not in r and not f.nullable:
                raise ValueError(f"chat record {r.get('sample_id')!r} lacks required field {f.name!r}")
            value = r.get(f.name)
            if f.name == "loss_mask" and value is not None and loss_mask == "final_answer":
                value = final_answer_mask(value)
            cols[f.name].append(value)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
