"""Columnar inputs (Parquet, hf): one text column in, documents and quarantine rows out, vectorized."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.readers.base import BatchBuilder


def is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def add_text_column(
    b: BatchBuilder,
    texts: pa.Array,
    ids: pa.Array | None,
    first_record: int,
    text_field: str,
    where: Callable[[int], str],
) -> None:
    """Rows `first_record ...` of a text column (and optional id column) into `b`.

    `where(record)` names a row for messages, e.g. "row 17 of data/x.parquet".
    """
    n = len(texts)
    if n == 0:
        return
    b.records_read += n
    records = pa.array(np.arange(first_record, first_record + n, dtype=np.int64))
    if not (is_text_type(texts.type) or pa.types.is_null(texts.type)):
        _reject_all(b, texts, first_record, text_field, where)
        return
    texts = texts.cast(pa.large_string())
    null = _np_mask(texts.is_null())
    bad_raw = _invalid_utf8(texts)
    bad_utf8 = np.zeros(n, dtype=bool)
    bad_utf8[list(bad_raw)] = True
    if bad_raw:
        # blank out undecodable rows so the string kernels below only ever see valid UTF-8
        texts = pc.if_else(pa.array(bad_utf8), pa.scalar(None, pa.large_string()), texts)
    empty = (
        _np_mask(pc.or_(pc.equal(pc.binary_length(texts), 0), pc.utf8_is_space(texts))) & ~null & ~bad_utf8
    )
    keep = ~(null | bad_utf8 | empty)
    for i in np.flatnonzero(~keep).tolist():
        rec = first_record + i
        if bad_utf8[i]:
            b.quarantine(
                rec,
                "invalid_utf8",
                f"{where(rec)}: field {text_field!r} is not valid UTF-8; re-encode the column as UTF-8",
                raw=bad_raw[i],
            )
        elif null[i]:
            b.quarantine(
                rec,
                "missing_text_field",
                f"{where(rec)}: field {text_field!r} is null; drop the row upstream or fill in its text",
            )
        else:
            b.quarantine(
                rec,
                "empty_text",
                f"{where(rec)}: field {text_field!r} is empty or only whitespace; drop the row upstream "
                f"or point sources[].text_field at the column that holds the text",
                raw=texts[i].as_py().encode("utf-8"),
            )
    if keep.all():
        kept_texts, kept_records, kept_ids = texts, records, ids
    else:
        mask = pa.array(keep)
        kept_texts, kept_records = texts.filter(mask), records.filter(mask)
        kept_ids = None if ids is None else ids.filter(mask)
    fallback = pc.binary_join_element_wise(
        pa.scalar(b.uri + "#"), pc.cast(kept_records, pa.string()), pa.scalar("")
    )
    doc_ids = fallback if kept_ids is None else pc.coalesce(_as_strings(kept_ids), fallback)
    b.add_doc_columns(kept_records, doc_ids, kept_texts)


def _np_mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _invalid_utf8(texts: pa.Array) -> dict[int, bytes]:
    """Rows whose bytes are not valid UTF-8 (Parquet readers do not check), with their bytes."""
    try:
        texts.validate(full=True)
        return {}
    except pa.ArrowInvalid:
        pass
    out: dict[int, bytes] = {}
    for i, v in enumerate(texts.view(pa.large_binary()).to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                out[i] = v
    return out


def _as_strings(ids: pa.Array) -> pa.Array:
    try:
        return pc.cast(ids, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.string())


def _reject_all(
    b: BatchBuilder, texts: pa.Array, first_record: int, text_field: str, where: Callable[[int], str]
) -> None:
    null = _np_mask(texts.is_null())
    for i in range(len(texts)):
        rec = first_record + i
        if null[i]:
            b.quarantine(rec, "missing_text_field", f"{where(rec)}: field {text_field!r} is null")
        else:
            b.quarantine(
                rec,
                "text_not_string",
                f"{where(rec)}: field {text_field!r} has type {texts.type}, not string; "
                f"set sources[].text_field to a column holding the text",
                raw=str(texts[i].as_py())[:1024].encode("utf-8", "replace"),
            )
