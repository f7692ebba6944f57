"""Read the figures a dataset card states back out of it, and compare them with the manifest.

`longloom publish` uploads README.md as it finds it, so prose added by hand survives; but a card
whose numbers were edited (40 rows made 4000) or left over from another run must not go up. The
figures checked are the ones a reader relies on: rows and bytes per config in the YAML
`dataset_info` and the Configs table, the totals in the summary line, and the per-config and
per-source token counts in the pretraining and mixture tables. Tables a user removed are not
checked; a table that is there must be right.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.manifest import Manifest


def md_tables(body: str) -> dict[str, list[dict[str, str]]]:
    """The first Markdown table under each heading: heading text -> rows as {header: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    heading = ""
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            headers = [h.strip() for h in line.strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))]
                rows.append(dict(zip(headers, cells, strict=False)))
                i += 1
            out.setdefault(heading, rows)
            continue
        i += 1
    return out


def _int(cell: str | None) -> int | None:
    if cell is None:
        return None
    text = cell.strip().strip("`").replace(",", "")
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _name(cell: str) -> str:
    return cell.strip().strip("`")


def expected_configs(manifest: Manifest) -> dict[str, dict[str, int]]:
    """Rows, files, bytes (and tokens for packed configs) of every config, from the manifest."""
    out: dict[str, dict[str, int]] = {}
    for t in manifest.targets:
        out[t.config_name] = {
            "Rows": t.rows,
            "Tokens": t.tokens,
            "Files": len(t.shards),
            "Bytes": sum(e.bytes for e in t.shards),
        }
    groups = list(manifest.extra_configs.items()) + [(f"audit_{k}", v) for k, v in manifest.audit.items()]
    for name, files in groups:
        out[name] = {
            "Rows": sum(e.rows for e in files),
            "Files": len(files),
            "Bytes": sum(e.bytes for e in files),
        }
    return out


def figure_mismatches(meta: dict[str, Any], body: str, manifest: Manifest) -> list[str]:
    """Every figure of the card that disagrees with the manifest, each as a short phrase."""
    wrong: list[str] = []
    want = expected_configs(manifest)

    for info in meta.get("dataset_info") or []:
        name = info.get("config_name")
        if name not in want:
            wrong.append(f"`dataset_info` describes config {name!r}, which this run did not write")
            continue
        rows = sum(int(s.get("num_examples", 0)) for s in info.get("splits") or [])
        if rows != want[name]["Rows"]:
            wrong.append(
                f"`dataset_info` says {name} has {rows:,} rows; manifest.json says {want[name]['Rows']:,}"
            )
        if "download_size" in info and int(info["download_size"]) != want[name]["Bytes"]:
            wrong.append(
                f"`dataset_info` says {name} is {int(info['download_size']):,} bytes; "
                f"manifest.json says {want[name]['Bytes']:,}"
            )

    tables = md_tables(body)
    for row in tables.get("Configs", []):
        name = _name(row.get("Config", ""))
        if name not in want:
            wrong.append(f"the Configs table lists {name!r}, which this run did not write")
            continue
        for col, value in want[name].items():
            got = _int(row.get(col))
            if col in row and got is not None and got != value:
                wrong.append(
                    f"the Configs table says {name} has {got:,} {col.lower()}; manifest.json says {value:,}"
                )

    targets = {t.config_name: t for t in manifest.targets}
    pretrain_cols = {
        "Rows": "rows",
        "Tokens": "tokens",
        "Document tokens": "content_tokens",
        "Padding": "pad_tokens",
    }
    for row in tables.get("Pretraining rows", []):
        t = targets.get(_name(row.get("Config", "")))
        if t is None:
            wrong.append(
                f"the Pretraining rows table lists {row.get('Config')!r}, which this run did not write"
            )
            continue
        for col, attr in pretrain_cols.items():
            got, value = _int(row.get(col)), getattr(t, attr)
            if got is not None and got != value:
                wrong.append(
                    f"the Pretraining rows table says {t.config_name} has {got:,} {col.lower()}; "
                    f"manifest.json says {value:,}"
                )

    source_cols = {
        "Records read": "records_read",
        "Tokens read": "tokens_read",
        "Tokens kept": "kept_tokens",
        "Tokens in rows": "packed_tokens",
    }
    for row in tables.get("Source mixture before and after filtering", []):
        src = manifest.sources.get(_name(row.get("Source", "")))
        if src is None:
            wrong.append(f"the mixture table lists source {row.get('Source')!r}, which this run did not read")
            continue
        for col, attr in source_cols.items():
            got, value = _int(row.get(col)), getattr(src, attr)
            if got is not None and got != value:
                wrong.append(
                    f"the mixture table says {_name(row['Source'])} has {got:,} {col.lower()}; "
                    f"manifest.json says {value:,}"
                )

    rows = sum(t.rows for t in manifest.targets)
    tokens = sum(t.tokens for t in manifest.targets)
    m = re.search(r"([\d,]+) rows holding ([\d,]+) tokens", body)
    if m and (_int(m.group(1)), _int(m.group(2))) != (rows, tokens):
        wrong.append(
            f"the summary says {m.group(1)} rows holding {m.group(2)} tokens; manifest.json says "
            f"{rows:,} rows holding {tokens:,} tokens"
        )
    return wrong
