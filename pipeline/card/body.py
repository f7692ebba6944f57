"""The card's Markdown body. Every figure is a recount from the rows (`CardStats`) or a manifest field."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.card.meta import ConfigFiles, LicenceShare, SchemaCheck, empty_tables
from pipeline.card.stats import CardStats
from pipeline.plots import Plot
from schemas.manifest import Manifest
from schemas.publish import CardConfig

# Config sections that decide the output bytes, shown as the build parameters.
PARAMETER_SECTIONS = ("tokenizer", "filters", "diversity", "packing", "procedural", "rewriter")
ROW_FIELDS = {
    "row_id": "stable id of the row",
    "input_ids": "token ids, exactly `length` of them",
    "length": "tokens in the row (always the target length)",
    "target_length": "the configured row length",
    "n_pad": "padding tokens at the end of the row",
    "n_segments": "document pieces in the row",
    "text": "the row decoded back to text",
    "segments": "where every token came from: source, input file and revision, document id and hash, "
    "character/byte/token spans in the document and in the row, split flag, packing step",
    "lineage": "config hash, tokenizer and its vocabulary hash, Longloom version, seed, steps",
}


@dataclass
class CardCheck:
    name: str
    ok: bool
    detail: str


def n(x: int | float) -> str:
    return f"{x:,.0f}" if isinstance(x, int) or float(x).is_integer() else f"{x:,.1f}"


def pct(a: int | float, b: int | float) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        return n(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    return [*lines, ""]


def image(p: Plot | None) -> list[str]:
    return [f"![{p.alt}]({p.path})", ""] if p else []


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def generic(value: Any, depth: int = 4) -> list[str]:
    """Render statistics of a stage this module knows nothing about: tables where the shape allows."""
    if isinstance(value, dict) and value and all(is_scalar(v) for v in value.values()):
        return table(["key", "value"], ([k, "–" if v is None else v] for k, v in value.items()))
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(v, dict) and v and all(is_scalar(x) for x in v.values()) for v in value.values())
    ):
        cols = list(dict.fromkeys(k for v in value.values() for k in v))
        return table(["", *cols], ([k, *(v.get(c, "") for c in cols)] for k, v in value.items()))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and all(is_scalar(x) for x in v.values()) for v in value)
    ):
        cols = list(dict.fromkeys(k for v in value for k in v))
        return table(cols, ([v.get(c, "") for c in cols] for v in value))
    if isinstance(value, dict) and value and depth <= 6:
        lines: list[str] = []
        scalars = {k: v for k, v in value.items() if is_scalar(v)}
        if scalars:
            lines += generic(scalars, depth)
        for k, v in value.items():
            if not is_scalar(v):
                lines += [f"{'#' * depth} {k}", "", *generic(v, depth + 1)]
        return lines
    return ["```json", json.dumps(value, indent=2, sort_keys=True, default=str), "```", ""]


class CardBody:
    """Assembles the Markdown body section by section."""

    def __init__(
        self,
        manifest: Manifest,
        stats: CardStats,
        configs: list[ConfigFiles],
        plots: dict[str, Plot],
        licences: list[LicenceShare],
        checks: list[CardCheck],
        schemas: list[SchemaCheck],
        card: CardConfig,
        title: str,
    ) -> None:
        self.m = manifest
        self.s = stats
        self.configs = configs
        self.plots = plots
        self.licences = licences
        self.checks = checks
        self.schemas = schemas
        self.card = card
        self.title = title

    def render(self) -> str:
        lines = [f"# {self.title}", ""]
        for section in (
            self.summary,
            self.contents,
            self.pretrain,
            self.mixture,
            self.drops,
            self.synthetic,
            self.built,
            self.extras,
            self.verification,
            self.limitations,
            self.licence_section,
        ):
            lines += section()
        return "\n".join(lines).rstrip() + "\n"

    # --- sections ---------------------------------------------------------------------------------

    def summary(self) -> list[str]:
        m, s = self.m, self.s
        rows = sum(p.rows for p in s.pretrain)
        tokens = sum(p.tokens for p in s.pretrain)
        lengths = _and([n(p.target_length) for p in s.pretrain])
        sources = ", ".join(f"`{k}`" for k in m.sources)
        text = (
            f"Long-context pretraining data built by [Longloom](https://pypi.org/project/longloom/) "
            f"{m.longloom_version}: {n(rows)} rows holding {n(tokens)} tokens, packed to exactly "
            f"{lengths} tokens per row with the `{m.tokenizer.name}` tokenizer (vocabulary hash "
            f"`{m.tokenizer.vocab_hash}`), from {len(m.sources)} sources ({sources})."
        )
        if s.chat:
            text += (
                f" It also holds {n(sum(c.rows for c in s.chat))} synthesized chat samples with "
                "long-range dependencies."
            )
        lines = [
            text,
            "",
            "Every row records where each of its tokens came from (the `segments` column: source, input "
            "file and revision, document id and content hash, spans in the document and in the row), so any "
            "token can be traced back to its input. This card was generated from `manifest.json` and the rows "
            f"themselves (config hash `{m.config_hash}`); its figures are recounts, not estimates.",
            "",
        ]
        if self.card.description:
            lines += [self.card.description.strip(), ""]
        return lines

    def contents(self) -> list[str]:
        what = {
            "pretrain": "packed pretraining rows",
            "chat": "synthesized chat samples",
            "table": "table from an optional stage",
            "audit": "audit table",
        }
        pre = {p.config_name: p for p in self.s.pretrain}
        chat = {c.config_name: c for c in self.s.chat}
        other = {t.name: t for t in self.s.tables} | {f"audit_{t.name}": t for t in self.s.audit}
        rows = []
        for c in self.configs:
            size = sum(e.bytes for e in c.files)
            if c.name in pre:
                p = pre[c.name]
                rows.append(
                    [f"`{c.name}`", what[c.kind], p.rows, p.tokens, n(p.target_length), len(c.files), size]
                )
            elif c.name in chat:
                ch = chat[c.name]
                lens = ", ".join(n(x) for x in sorted(ch.target_lengths)) or "–"
                rows.append([f"`{c.name}`", what[c.kind], ch.rows, ch.tokens, lens, len(c.files), size])
            else:
                t = other[c.name]
                rows.append([f"`{c.name}`", what[c.kind], t.rows, "–", "–", len(c.files), size])
        repo = (self.m.config.get("publish") or {}).get("repo_id") or "PATH/TO/THIS/FOLDER"
        first = self.configs[0].name if self.configs else "default"
        empty = empty_tables(self.m)
        note = (
            [
                f"Written but empty, so not listed as configs (`datasets` cannot load an empty split): "
                f"{', '.join(f'`{x}`' for x in empty)}.",
                "",
            ]
            if empty
            else []
        )
        return [
            "## Configs",
            "",
            *table(["Config", "What", "Rows", "Tokens", "Tokens per row", "Files", "Bytes"], rows),
            *note,
            "Each config is one folder of Parquet shards with a single `train` split:",
            "",
            "```python",
            "from datasets import load_dataset",
            f'rows = load_dataset("{repo}", "{first}", split="train")',
            "```",
            "",
        ]

    def pretrain(self) -> list[str]:
        s = self.s
        if not s.pretrain:
            return []
        lines = [
            "## Pretraining rows",
            "",
            *table(
                [
                    "Config",
                    "Rows",
                    "Tokens",
                    "Document tokens",
                    "Separators",
                    "Padding",
                    "Padding share",
                    "Documents",
                    "Split documents",
                    "Segments",
                    "Most segments in a row",
                ],
                (
                    [
                        f"`{p.config_name}`",
                        p.rows,
                        p.tokens,
                        p.content_tokens,
                        p.separator_tokens,
                        p.pad_tokens,
                        pct(p.pad_tokens, p.tokens),
                        p.documents,
                        p.split_documents,
                        p.segments,
                        p.max_segments_per_row,
                    ]
                    for p in s.pretrain
                ),
            ),
        ]
        sources = list(dict.fromkeys(k for p in s.pretrain for k in p.sources))
        lines += ["### Tokens per source", "", *image(self.plots.get("tokens_by_source"))]
        lines += table(
            ["Config", *(f"`{x}`" for x in sources)],
            (
                [f"`{p.config_name}`", *(p.sources[x].tokens if x in p.sources else 0 for x in sources)]
                for p in s.pretrain
            ),
        )
        lines += ["### Document lengths", "", *image(self.plots.get("doc_tokens_by_source"))]
        docs: dict[str, list[int]] = {}
        for p in s.pretrain:
            for name, src in p.sources.items():
                d = docs.setdefault(name, [0, 0, 0, 0])
                d[0] += src.doc_tokens.count
                d[1] += src.doc_tokens.total
                d[2] = max(d[2], src.doc_tokens.max)
                d[3] += src.split_documents
        lines += table(
            ["Source", "Documents", "Mean tokens", "Longest", "Split across rows"],
            ([f"`{k}`", v[0], round(v[1] / v[0], 1) if v[0] else 0, v[2], v[3]] for k, v in docs.items()),
        )
        lines += [
            "Document lengths count each document once, at its first piece; a document longer than a row "
            "is split, and every piece is recorded in `segments` with `is_split` and `part`.",
            "",
        ]
        return lines

    def mixture(self) -> list[str]:
        m = self.m
        src_cfg = {s["name"]: s for s in m.config.get("sources", [])}
        in_rows = self.s.source_tokens()
        read_total = sum(c.tokens_read for c in m.sources.values())
        kept_total = sum(c.kept_tokens for c in m.sources.values())
        rows_total = sum(in_rows.values())
        rows = []
        for name, c in m.sources.items():
            cfg = src_cfg.get(name, {})
            rows.append(
                [
                    f"`{name}`",
                    cfg.get("kind", ""),
                    cfg.get("license") or "unknown",
                    c.records_read,
                    sum(c.quarantined.values()),
                    c.documents,
                    c.tokens_read,
                    pct(c.tokens_read, read_total),
                    sum(c.filtered.values()),
                    c.kept_tokens,
                    pct(c.kept_tokens, kept_total),
                    in_rows.get(name, 0),
                    pct(in_rows.get(name, 0), rows_total),
                ]
            )
        return [
            "## Source mixture before and after filtering",
            "",
            *image(self.plots.get("mixture")),
            *table(
                [
                    "Source",
                    "Kind",
                    "Licence",
                    "Records read",
                    "Quarantined",
                    "Documents",
                    "Tokens read",
                    "Share read",
                    "Documents dropped",
                    "Tokens kept",
                    "Share kept",
                    "Tokens in rows",
                    "Share in rows",
                ],
                rows,
            ),
            "*Tokens read* counts every document before filtering; *tokens kept* after filters, dedup and "
            "budgets; *tokens in rows* is recounted from the rows' `segments`.",
            "",
        ]

    def drops(self) -> list[str]:
        rows: list[list[Any]] = []
        for name, c in self.m.sources.items():
            for reason, k in sorted(c.quarantined.items()):
                rows.append(["read (quarantine)", f"`{name}`", "", reason, k, "–"])
        for t in self.s.audit:
            if t.name == "quarantine":
                continue
            stage = "filters and dedup" if t.name == "filtered" else t.name
            for (src, step, reason), k in sorted(t.by_reason.items()):
                tok = t.tokens_by_reason.get((src, step, reason)) if t.tokens_by_reason else None
                rows.append([stage, f"`{src}`", step, reason, k, "–" if tok is None else tok])
            if not t.by_reason and t.rows:
                rows.append([stage, "", "", "(see table)", t.rows, "–"])
        for name, c in self.m.sources.items():
            if c.dropped_tail_tokens:
                rows.append(
                    ["last partial row dropped", f"`{name}`", "", "last_row=drop", "–", c.dropped_tail_tokens]
                )
        lines = ["## Drops by reason", ""]
        if not rows:
            return [*lines, "Nothing was dropped.", ""]
        lines += table(["Stage", "Source", "Step", "Reason", "Documents", "Tokens"], rows)
        audit = ", ".join(f"`{c.name}`" for c in self.configs if c.kind == "audit") or "none with rows"
        lines += [
            f"Every dropped document is listed with its reason in the audit configs ({audit}); quarantined "
            "records keep their file, line or row and the first bytes of the input.",
            "",
        ]
        return lines

    def synthetic(self) -> list[str]:
        chat = self.s.chat
        extra = {k: self.m.extra[k] for k in ("procedural", "rewriter") if k in self.m.extra}
        if not chat and not extra:
            return []
        lines = ["## Synthetic samples", ""]
        if chat:
            rows = []
            for c in chat:
                for task, t in sorted(c.tasks.items()):
                    d = t.dependency_distance
                    rows.append(
                        [
                            f"`{c.config_name}`",
                            task,
                            ", ".join(f"{g} ({n(k)})" for g, k in sorted(t.generators.items())) or "–",
                            t.rows,
                            pct(t.rows, c.rows),
                            t.tokens,
                            t.context_tokens,
                            round(d.mean, 1) if d.count else "–",
                            d.max if d.count else "–",
                        ]
                    )
            lines += [
                "### Task mix",
                "",
                *table(
                    [
                        "Config",
                        "Task",
                        "Generators",
                        "Samples",
                        "Share",
                        "Tokens",
                        "Context tokens",
                        "Mean dependency distance",
                        "Max dependency distance",
                    ],
                    rows,
                ),
                "The *dependency distance* of a sample is the number of tokens between the farthest piece of "
                "evidence a question needs and the question itself.",
                "",
                *image(self.plots.get("dependency_distance")),
            ]
            models: Counter[tuple[str, ...]] = Counter()
            for c in chat:
                models.update(c.models)
            if models:
                lines += [
                    "### Rewriter models and prompt templates",
                    "",
                    *table(
                        ["Model", "Endpoint host", "Template", "Template version", "Prompt hash", "Samples"],
                        ([*(f"`{v}`" if v else "–" for v in key), k] for key, k in sorted(models.items())),
                    ),
                ]
        for key, value in extra.items():
            lines += [f"### `{key}` stage (validation and counts)", "", *generic(value)]
        return lines

    def built(self) -> list[str]:
        m = self.m
        lines = [
            "## How it was built",
            "",
            f"- Longloom version: `{m.longloom_version}`",
            f"- Config hash: `{m.config_hash}` (every setting that decides the output bytes)",
            f"- Tokenizer: `{m.tokenizer.name}`, vocabulary hash `{m.tokenizer.vocab_hash}`, "
            f"{n(m.tokenizer.n_vocab)} ids; separator `{m.tokenizer.separator}` = {m.tokenizer.separator_id}, "
            f"padding `{m.tokenizer.pad_token}` = {m.tokenizer.pad_id}",
            f"- Seed: `{m.seed}`",
            "",
            "### Stages that ran",
            "",
        ]
        rows = []
        for name, st in m.stages.items():
            notes = "; ".join(f"{k}={v}" for k, v in st.notes.items())
            rows.append(
                [
                    name,
                    "–" if st.items_in is None else st.items_in,
                    "–" if st.items_out is None else st.items_out,
                    "–" if st.tokens_in is None else st.tokens_in,
                    "–" if st.tokens_out is None else st.tokens_out,
                    notes or "",
                ]
            )
        lines += table(["Stage", "Items in", "Items out", "Tokens in", "Tokens out", "Notes"], rows)
        params = {k: m.config[k] for k in PARAMETER_SECTIONS if k in m.config and _enabled(m.config[k])}
        params["sources"] = [_compact_source(x) for x in m.config.get("sources", [])]
        lines += [
            "### Parameters",
            "",
            "<details><summary>Stage parameters from the run's config (sources, tokenizer, filters, "
            "packing and any optional stage)</summary>",
            "",
            "```yaml",
            yaml.safe_dump(params, sort_keys=False, allow_unicode=True).rstrip(),
            "```",
            "",
            "</details>",
            "",
            "### Rebuilding it",
            "",
            "The run was started with:",
            "",
            "```bash",
            f"pip install longloom=={m.longloom_version}",
            m.command,
            "```",
            "",
            "`manifest.json` holds the whole config (`config`); written back to YAML beside the same inputs, "
            f"`longloom build CONFIG.yaml` reproduces config hash `{m.config_hash}` and the same shard "
            "checksums. The inputs, with the revision (sha256 of the file, or the dataset revision) each "
            "one had:",
            "",
        ]
        lines += table(
            ["Source", "Input", "Revision", "Bytes", "Records"],
            ([f"`{i.source}`", f"`{i.uri}`", f"`{i.revision or '–'}`", i.bytes, i.records] for i in m.inputs),
        )
        return lines

    def extras(self) -> list[str]:
        shown = {"procedural", "rewriter"}
        rest = {k: v for k, v in self.m.extra.items() if k not in shown}
        if not rest:
            return []
        lines = ["## Optional stage statistics", ""]
        for key, value in rest.items():
            lines += [f"### `{key}`", "", *generic(value)]
        return lines

    def verification(self) -> list[str]:
        m = self.m
        bad = [c for c in m.checks if not c.ok]
        card_bad = [c for c in self.checks if not c.ok] + [c for c in self.schemas if not c.ok]
        lines = [
            "## Checks",
            "",
            f"The run's reconciliation: {len(m.checks) - len(bad)} of {len(m.checks)} checks pass "
            "(records read = kept + filtered + quarantined per source, row tokens = document tokens + "
            "separators + padding, shard checksums).",
            "",
        ]
        lines += [f"- FAILED: {c.name}: {c.detail}" for c in bad]
        lines += [
            f"Recounted for this card from the files: {len(self.checks) + len(self.schemas) - len(card_bad)} of "
            f"{len(self.checks) + len(self.schemas)} agree with the manifest.",
            "",
        ]
        lines += table(
            ["Check", "Result", "Detail"],
            [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in self.checks]
            + [[f"`{c.config}` schema", "ok" if c.ok else "FAILED", c.detail] for c in self.schemas],
        )
        return lines

    def limitations(self) -> list[str]:
        m, s = self.m, self.s
        cfg = m.config
        packing = cfg.get("packing", {})
        out = [
            f"Rows are token ids of `{m.tokenizer.name}`; another tokenizer needs the text re-tokenized "
            + (
                "(the `text` column holds it)."
                if any(p.has_text for p in s.pretrain)
                else "(the text is not stored: rebuild from the inputs listed above)."
            )
        ]
        tokens = sum(p.tokens for p in s.pretrain)
        pad = sum(p.pad_tokens for p in s.pretrain)
        if pad:
            out.append(
                f"{n(pad)} of {n(tokens)} tokens ({pct(pad, tokens)}) are padding (`n_pad`), at the end of rows."
            )
        split = sum(t.split_documents for t in m.targets)
        needless = sum(t.needless_splits for t in m.targets)
        if split:
            out.append(
                f"{n(split)} documents are cut across rows ({n(needless)} of them would have fit in one row); "
                "a model sees such a document in pieces."
            )
        tail = sum(c.dropped_tail_tokens for c in m.sources.values())
        if tail:
            out.append(f"{n(tail)} document tokens were dropped with a final partial row (`last_row: drop`).")
        filtered: Counter[str] = Counter()
        for c in m.sources.values():
            filtered.update(c.filtered)
        if filtered.get("source_budget"):
            out.append(
                f"{n(filtered['source_budget'])} documents were left out by per-source token budgets: "
                "the mixture is chosen, not natural."
            )
        if filtered.get("short_doc_downsampled"):
            out.append(
                f"{n(filtered['short_doc_downsampled'])} short documents were randomly left out "
                "(short-document downsampling, seeded)."
            )
        q = sum(sum(c.quarantined.values()) for c in m.sources.values())
        if q:
            out.append(
                f"{n(q)} input records could not be read and are in `audit_quarantine`, not in the rows."
            )
        if not (cfg.get("diversity") or {}).get("embedder"):
            out.append("Deduplication is exact (content hash) only; near-duplicates remain.")
        if packing.get("doc_order", "input") == "input":
            out.append("Documents are packed in input order, not shuffled; shuffle rows before training.")
        missing = [x["name"] for x in cfg.get("sources", []) if not x.get("license")]
        if missing:
            out.append(f"Sources without a configured licence: {', '.join(missing)}.")
        if s.chat:
            out.append(
                "Synthetic samples are machine-made: procedural tasks are artificial by design, and rewriter "
                "output passed automatic checks only (evidence found in the context, dependency distance)."
            )
        bad = [c for c in m.checks if not c.ok] + [c for c in self.checks if not c.ok]
        if bad:
            out.append(f"{len(bad)} consistency checks FAILED (see Checks): do not trust the figures above.")
        out += list(self.card.limitations)
        return ["## Known limitations", "", *(f"- {x}" for x in out), ""]

    def licence_section(self) -> list[str]:
        total = sum(x.tokens for x in self.licences)
        return [
            "## Licences",
            "",
            "Each source keeps its own licence; the rows mix them in these proportions:",
            "",
            *table(
                ["Licence", "Sources", "Tokens in rows", "Share"],
                (
                    [x.licence, ", ".join(f"`{s}`" for s in x.sources), x.tokens, pct(x.tokens, total)]
                    for x in self.licences
                ),
            ),
        ]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else ""


def _compact_source(src: dict[str, Any]) -> dict[str, Any]:
    """A source's settings without unset fields, and without code options for non-code sources."""
    return {k: v for k, v in src.items() if v is not None and not (k == "code" and src.get("kind") != "code")}


def _enabled(section: Any) -> bool:
    """A config section worth showing: not an optional stage that is switched off."""
    return not (isinstance(section, dict) and section.get("enabled") is False)
