"""The card's Markdown body. Every figure is a recount from the rows (`CardStats`) or a manifest field."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from pipeline.output.card.meta import ConfigFiles, LicenceShare, SchemaCheck, empty_tables
from pipeline.output.card.stats import CardStats
from pipeline.output.plots import Plot
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
    if isinstance(value, list) and all(is_scalar(v) for v in value):
        # e.g. a histogram's counts: one line, not one line per number
        return [", ".join("–" if v is None else _cell(v) for v in value) or "(none)", ""]
    if isinstance(value, dict) and value and depth <= 5:
        lines: list[str] = []
        scalars = {k: v for k, v in value.items() if is_scalar(v)}
        if scalars:
            lines += generic(scalars, depth)
        for k, v in value.items():
            if not is_scalar(v):
                # headings stop at level 5; deeper levels become bold labels
                head = f"{'#' * depth} {k}" if depth <= 4 else f"**{k}**"
                lines += [head, "", *generic(v, depth + 1)]
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
        include_audit: bool = True,
        out: Path | None = None,
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
        self.include_audit = include_audit
        self.out = out

    def render(self) -> str:
        lines = [f"# {self.title}", ""]
        for section in (
            self.summary,
            self.contents,
            self.usage,
            self.data_fields,
            self.pretrain,
            self.mixture,
            self.drops,
            self.synthetic,
            self.long_dependency,
            self.built,
            self.extras,
            self.verification,
            self.sources_section,
            self.personal_information,
            self.bias,
            self.limitations,
            self.licence_section,
            self.citation,
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
            f"Long-context pretraining data built by Longloom "
            f"{m.longloom_version}: {n(rows)} rows holding {n(tokens)} tokens, packed to exactly "
            f"{lengths} tokens per row with the `{m.tokenizer.name}` tokenizer (vocabulary hash "
            f"`{m.tokenizer.vocab_hash}`), from {len(m.sources)} sources ({sources})."
        )
        if s.chat:
            text += (
                f" It also holds {n(sum(c.rows for c in s.chat))} synthesized chat samples with "
                "long-range dependencies"
            )
            questions = sum(e.rows for e in s.evals)
            text += (
                f", and {n(questions)} evaluation questions about them (one row per question, in "
                f"{_and([f'`{e.config_name}`' for e in s.evals])})."
                if s.evals
                else "."
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
            "eval": "evaluation questions (one per row) about the samples",
            "table": "table from an optional stage",
            "audit": "audit table",
        }
        pre = {p.config_name: p for p in self.s.pretrain}
        chat = {c.config_name: c for c in self.s.chat}
        evals = {e.config_name: e for e in self.s.evals}
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
            elif c.name in evals:
                ev = evals[c.name]
                lens = ", ".join(n(x) for x in sorted(ev.target_lengths)) or "–"
                rows.append(
                    [f"`{c.name}`", what[c.kind], ev.rows, ev.prompt_tokens, lens, len(c.files), size]
                )
            else:
                t = other[c.name]
                rows.append([f"`{c.name}`", what[c.kind], t.rows, "–", "–", len(c.files), size])
        repo = (self.m.config.get("publish") or {}).get("repo_id") or "PATH/TO/THIS/FOLDER"
        first = self.configs[0].name if self.configs else "default"
        empty = empty_tables(self.m)
        unpublished = (
            []
            if self.include_audit
            else [
                "The audit tables (documents dropped with their reasons, unreadable input) stay with the "
                "output folder and are not part of this repository (`publish.include_audit: false`).",
                "",
            ]
        )
        note = unpublished + (
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
            "*Tokens* of an evaluation config are the tokens of its rendered prompts.",
            "",
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
        where = (
            f"the audit configs ({audit})"
            if self.include_audit
            else "the audit tables kept with the output folder (not published here)"
        )
        lines += [
            f"Every dropped document is listed with its reason in {where}; quarantined records keep their "
            "file, line or row and the first bytes of the input.",
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
                            (
                                f"{n(t.supervised_tokens)} ({100 * t.supervised_tokens / t.masked_tokens:.2f}%)"
                                if t.masked_tokens
                                else "–"
                            ),
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
                        "Supervised tokens",
                        "Mean dependency distance",
                        "Max dependency distance",
                    ],
                    rows,
                ),
                "The *dependency distance* of a sample is the number of tokens between the farthest piece of "
                "evidence a question needs and the question itself. *Supervised tokens* is the share of the "
                "samples' tokens that `loss_mask` marks for training (the assistant turns).",
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
        lines += self.eval_questions()
        for key, value in extra.items():
            if key == "procedural" and isinstance(value, dict):
                lines += self.procedural(value)
            else:
                lines += [f"### `{key}` stage (validation and counts)", "", *generic(value)]
        return lines

    def eval_questions(self) -> list[str]:
        """The evaluation exports: questions (not samples) per task, with their prompt tokens."""
        if not self.s.evals:
            return []
        rows = []
        for e in self.s.evals:
            for task, t in sorted(e.tasks.items()):
                d = t.dependency_distance
                rows.append(
                    [
                        f"`{e.config_name}`",
                        task,
                        t.questions,
                        len(t.samples),
                        t.prompt_tokens,
                        round(d.mean, 1) if d.count else "–",
                        d.max if d.count else "–",
                    ]
                )
        return [
            "### Evaluation questions",
            "",
            *table(
                [
                    "Config",
                    "Task",
                    "Questions",
                    "Samples asked about",
                    "Prompt tokens",
                    "Mean dependency distance",
                    "Max dependency distance",
                ],
                rows,
            ),
            "Each row of an evaluation config is one question: the sample's conversation up to that question "
            "(earlier turns with their reference answers), the expected answer and how it is graded "
            "(`longloom score` grades a model's answers). A sample with several questions has several rows, "
            "so these are not further samples.",
            "",
        ]

    def procedural(self, st: dict[str, Any]) -> list[str]:
        """The procedural stage's statistics as tables and plots (its JSON stays in manifest.json)."""
        lines = ["### Procedural generation", ""]
        facts = [
            f"{n(st['samples'])} samples" if "samples" in st else None,
            f"{n(st['questions'])} questions" if "questions" in st else None,
            f"{n(st['tokens'])} tokens" if "tokens" in st else None,
            f"chat template `{st['chat_template']}`" if st.get("chat_template") else None,
            f"lengths count `{st['length_counts']}`" if st.get("length_counts") else None,
        ]
        said = [f for f in facts if f]
        if said:
            lines += [f"The procedural stage made {_and(said)}.", ""]
        checks = st.get("checks") or []
        if checks:
            lines += table(
                ["Check", "Result", "Detail"],
                ([c.get("name", ""), "ok" if c.get("ok") else "FAILED", c.get("detail", "")] for c in checks),
            )
        by_length = st.get("target_lengths") or {}
        if by_length:
            lines += [
                "#### Per target length",
                "",
                *table(
                    ["Target length", "Samples", "Repeated rows", "Re-tokenized haystacks"],
                    (
                        [
                            n(int(k)),
                            v.get("samples", 0),
                            v.get("repeated_rows", 0),
                            v.get("retokenized_haystacks", 0),
                        ]
                        for k, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))
                    ),
                ),
            ]
        tasks = st.get("tasks") or {}
        if tasks:
            rows, per_length = [], []
            for label, t in sorted(tasks.items()):
                tok = t.get("dependency_distance_tokens") or {}
                rel = t.get("dependency_distance_relative") or {}
                rows.append(
                    [
                        label,
                        t.get("samples", 0),
                        t.get("questions", 0),
                        _q(tok, "min"),
                        _q(tok, "p50"),
                        _q(tok, "mean"),
                        _q(tok, "max"),
                        f"{100 * rel['mean']:.0f}%" if "mean" in rel else "–",
                    ]
                )
                for length, q in sorted((t.get("by_target_length") or {}).items(), key=lambda kv: int(kv[0])):
                    per_length.append(
                        [label, n(int(length)), _q(q, "min"), _q(q, "p50"), _q(q, "mean"), _q(q, "max")]
                    )
            lines += [
                "#### Dependency distance per task",
                "",
                *table(
                    [
                        "Task",
                        "Samples",
                        "Questions",
                        "Min (tokens)",
                        "Median",
                        "Mean",
                        "Max",
                        "Mean share of the target length",
                    ],
                    rows,
                ),
                *table(["Task", "Target length", "Min (tokens)", "Median", "Mean", "Max"], per_length),
                *image(self.plots.get("procedural_distance")),
                *image(self.plots.get("procedural_depth")),
                "Distances are per question (tokens from the earliest evidence it needs to the question); "
                "depths are per piece of evidence (0 = start of the context, 1 = its end).",
                "",
            ]
        known = {
            "samples",
            "questions",
            "tokens",
            "chat_template",
            "length_counts",
            "checks",
            "target_lengths",
            "tasks",
            "config_name",
            "eval_config_name",
            "generators",
            "ok",
        }
        rest = {k: v for k, v in st.items() if k not in known}
        if rest:
            lines += ["#### Other figures", "", *generic(rest, 5)]
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
            m.command,
            "```",
            "",
            *install_lines(m.longloom_version),
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

    def long_dependency(self) -> list[str]:
        """The long_dependency stage: what the score is, its lineage, and its distributions."""
        ld = self.m.extra.get("long_dependency")
        if not isinstance(ld, dict):
            return []
        st = ld.get("settings") or {}
        lines = [
            "## Long-range dependency",
            "",
            f"Every document was scored with `{ld.get('method')}` by `{ld.get('model_id')}` (fingerprint "
            f"`{ld.get('model_fingerprint')}`): the mean gain in log-probability, in nats per token, of "
            f"{st.get('spans_per_document')} sampled spans of {st.get('span_tokens')} tokens when the model "
            f"sees up to {st.get('max_context')} tokens of context instead of the last "
            f"{st.get('short_window')} (`{ld.get('score')}`"
            + (", with verbatim copies not counted" if ld.get("score") == "score" else "")
            + f"). {n(ld.get('scored', 0))} of {n(ld.get('documents', 0))} documents were scored; "
            f"{n(ld.get('too_short', 0))} were too short to score and are kept unjudged. A row's score is the "
            "token-weighted mean of the scores of the scored documents in it.",
            "",
        ]
        rows = [
            [
                name,
                n(v.get("count", 0)),
                v.get("mean", "–"),
                v.get("p10", "–"),
                v.get("p50", "–"),
                v.get("p90", "–"),
            ]
            for group in ("by_source", "by_target")
            for name, v in sorted((ld.get(group) or {}).items())
            if isinstance(v, dict)
        ]
        lines += table(["Source or config", "Scored", "Mean", "p10", "Median", "p90"], rows)
        if ld.get("filters"):
            f = "; ".join(
                f"`{s}`: " + ", ".join(f"{k} {v}" for k, v in sorted(r.items()) if v is not None)
                for s, r in sorted(ld["filters"].items())
            )
            lines += [f"Filters: {f} (drops are `filtered` rows with reason `low_long_dependency`).", ""]
        if ld.get("route") == "longest_first":
            lines += ["Routing: the highest-scoring documents went to the longest targets.", ""]
        lines += [
            *image(self.plots.get("long_dependency_by_source")),
            *image(self.plots.get("long_dependency_by_target")),
        ]
        return lines

    def extras(self) -> list[str]:
        shown = {"procedural", "rewriter", "long_dependency"}
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

    # --- usage, fields, provenance, responsible use, citation (issue 12, item 22) -------------------

    def repo(self) -> str:
        return (self.m.config.get("publish") or {}).get("repo_id") or "PATH/TO/THIS/FOLDER"

    def usage(self) -> list[str]:
        pre = [c.name for c in self.configs if c.kind == "pretrain"]
        if not pre:
            return []
        sep = self.m.tokenizer.separator_id
        return [
            "## Using the data",
            "",
            "Stream a config instead of downloading it whole, and build what a variable-length attention "
            "kernel needs from `segments`, so that no token attends across a document boundary:",
            "",
            "```python",
            *usage_snippet(self.repo(), pre[0]),
            "```",
            "",
            f"`cu_seqlens` are the offsets where each document (with its separator, id {sep}) starts and ends, "
            "the padding at the end of the row counting as one more sequence; `position_ids` restart at 0 at "
            "every document. Rows already carry the columns `output.boundary_columns` lists (by default "
            "`cu_seqlens`; `position_ids` doubles a row's size and follows from `cu_seqlens` as above). "
            "Pass them to a variable-length attention kernel (FlashAttention's `flash_attn_varlen_func(q, "
            "k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max(diff(cu_seqlens)), "
            "...)`), or to a Hugging Face model as `position_ids` with `attn_implementation="
            '"flash_attention_2"`: a batch of one packed row with `position_ids` restarting at each '
            "document is what `DataCollatorWithFlattening` produces, and the model then attends within "
            "documents only. For short rows, build the block-diagonal causal mask from `doc`. Leave the "
            "padding out of the loss (`labels = -100` from position `length - n_pad` on).",
            "",
            *self._chat_usage(),
        ]

    def _chat_usage(self) -> list[str]:
        if not any(c.kind == "chat" for c in self.configs):
            return []
        return [
            "Chat samples carry `loss_mask` (1 on the assistant tokens to learn, aligned with `input_ids`): "
            "`labels = np.where(np.asarray(row[\"loss_mask\"]) == 1, row[\"input_ids\"], -100)` trains on "
            "the answers only, as TRL's assistant-only loss does. To pack several samples into one "
            "sequence, concatenate their `input_ids` and labels and restart `position_ids` at each sample "
            "(what `DataCollatorWithFlattening` does with a list of such examples); every sample is then "
            "its own sequence for a varlen attention kernel.",
            "",
        ]

    def data_fields(self) -> list[str]:
        from pipeline.output.card.fields import columns, describe, table_kind_of

        if self.out is None:
            return []
        lines = [
            "## Data fields",
            "",
            "Token and character positions are 0-based and spans are half-open, `[start, end)`. `record` "
            "numbers follow the input: the 1-based line of a JSONL file, the 0-based row of a Parquet file "
            "or hub split.",
            "",
        ]
        seen: set[str] = set()
        for c in self.configs:
            schema = pq.read_schema(self.out / c.files[0].path)
            tag = ((schema.metadata or {}).get(b"longloom.table") or b"").decode() or None
            kind = table_kind_of(tag, c.kind)
            if kind in seen:
                continue
            seen.add(kind)
            same = (
                [x.name for x in self.configs if x.kind == c.kind]
                if c.kind in ("pretrain", "chat")
                else [c.name]
            )
            lines += [f"### {_and([f'`{x}`' for x in same])}" + (f" (`{tag}`)" if tag else ""), ""]
            lines += table(
                ["Column", "Type", "Meaning"],
                (
                    [f"`{path}`", typ, describe(kind, path) or "(not documented)"]
                    for path, typ in columns(schema)
                ),
            )
            example = example_row(self.out / c.files[0].path)
            if example:
                lines += [
                    "<details><summary>An example row (long values shortened)</summary>",
                    "",
                    "```json",
                    example,
                    "```",
                    "",
                    "</details>",
                    "",
                ]
        return lines

    def sources_section(self) -> list[str]:
        links = self.card.sources
        rows = []
        by_source: dict[str, list[str]] = {}
        for i in self.m.inputs:
            by_source.setdefault(i.source, []).append(i.uri)
        for src in self.m.config.get("sources", []):
            name = src["name"]
            link = links.get(name)
            lic = src.get("license") or "unknown"
            lic_url = (link.license_url if link else None) or licence_url(lic)
            origin = (link.origin if link else None) or hub_origin(src)
            inputs = by_source.get(name, [])
            shown = ", ".join(f"`{u}`" for u in inputs[:3]) + (
                f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
            )
            rows.append(
                [
                    f"`{name}`",
                    src.get("kind", ""),
                    f"[{origin}]({origin})" if origin else "not recorded",
                    shown or "–",
                    f"[{lic}]({lic_url})" if lic_url else lic,
                ]
            )
        return [
            "## Sources",
            "",
            *table(["Source", "Kind", "Upstream origin", "Inputs", "Licence"], rows),
            "*Upstream origin* is where the text was obtained, as the config's `card.sources` records it "
            "(hub datasets link themselves); licence links point to the licence text. Check each source's "
            "terms before redistributing rows that mix them.",
            "",
        ]

    def personal_information(self) -> list[str]:
        filters = sorted(_steps(self.m))
        return [
            "## Personal and sensitive information",
            "",
            "Longloom does not detect or remove personal data (names, addresses, contact details, "
            "identifiers) or sensitive content; the rows hold the source text as it was, apart from the "
            f"documents the configured steps dropped ({', '.join(f'`{x}`' for x in filters) or 'none'}). "
            "Whatever personal information the sources contain can therefore be in the rows, in the `text` "
            "column if stored, and in the audit tables, which keep the first bytes of unreadable input "
            "verbatim. Review the sources (and any LLM endpoint the rewriter used, which saw the contexts "
            "it was sent) before publishing or training on this data.",
            "",
        ]

    def bias(self) -> list[str]:
        m = self.m
        in_rows = self.s.source_tokens()
        total = sum(in_rows.values())
        top = max(in_rows, key=lambda k: in_rows[k]) if in_rows else None
        langs = sorted({s.get("language") for s in m.config.get("sources", []) if s.get("language")})
        lines = [
            "## Bias and representativeness",
            "",
            "The data is a chosen mixture, not a sample of any population of texts: which sources were "
            "included, their token budgets and the filters decide what a model trained on it sees."
            + (
                f" The largest source, `{top}`, holds {pct(in_rows[top], total)} of the document tokens in "
                "the rows (see *Source mixture*)."
                if top
                else ""
            ),
            "",
            f"- Languages declared by the sources: {', '.join(f'`{x}`' for x in langs) or 'none declared'}; "
            "other languages are under-represented or absent.",
            "- The biases of each source (its authors, period, genre and viewpoints) carry over unchanged; "
            "older or public-domain texts reflect the attitudes of their time.",
            "- Length filters and short-document downsampling shift the mixture towards long documents by "
            "design.",
        ]
        if self.s.chat:
            lines.append(
                "- Synthetic samples follow fixed templates; a model may learn the templates' phrasing and "
                "answer formats as well as the long-range skill they test."
            )
        return [*lines, ""]

    def citation(self) -> list[str]:
        entries = [dataset_bibtex(self.m, self.title, self.repo())]
        entries += [BIBTEX[k] for k in methods_used(self.m, self.s)]
        return [
            "## Citation",
            "",
            "If you use this dataset, cite it and the methods its build used:",
            "",
            "```bibtex",
            "\n\n".join(entries),
            "```",
            "",
        ]

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


def install_lines(version: str) -> list[str]:
    """How to get the Longloom that wrote the data: it is not on a package index, so from its source."""
    return [
        f"Longloom is not published on a package index (there is no `pip install longloom=={version}`). "
        f"Install version {version} from a checkout of its source repository, then run the command "
        "above from the folder the config's relative paths start at:",
        "",
        "```bash",
        "cd longloom              # a checkout of the Longloom source at version " + version,
        "pip install -e .",
        "```",
        "",
    ]


def usage_snippet(repo: str, config: str) -> list[str]:
    """Python that streams a config and builds document-boundary attention inputs from `segments`.

    tests/test_card.py runs this exact code against the output folder, so it cannot rot."""
    return [
        "import numpy as np",
        "from datasets import load_dataset",
        "",
        f'rows = load_dataset("{repo}", "{config}", split="train", streaming=True)',
        "for row in rows:",
        '    ids = np.asarray(row["input_ids"])',
        "    # which document each token belongs to; a separator belongs to the document it ends, padding is -1",
        "    doc = np.full(len(ids), -1)",
        '    for k, seg in enumerate(row["segments"]):',
        '        end = seg["row_token_end"] + int(seg["separator_after"])',
        '        doc[seg["row_token_start"] : end] = k',
        "    starts = np.flatnonzero(np.diff(doc, prepend=-2) != 0)  # where each sequence begins",
        "    cu_seqlens = np.append(starts, len(ids)).astype(np.int32)",
        "    position_ids = np.arange(len(ids)) - np.repeat(starts, np.diff(cu_seqlens))",
        "    break",
    ]


def example_row(path: Path, max_chars: int = 160, max_items: int = 3) -> str | None:
    """The first row of a Parquet file as indented JSON, with long strings and lists shortened."""
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        return None
    batch = next(pf.iter_batches(batch_size=1))
    row = batch.slice(0, 1).to_pylist()[0]

    def short(v: Any) -> Any:
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if isinstance(v, str):
            return v if len(v) <= max_chars else v[:max_chars] + f"… ({len(v):,} characters)"
        if isinstance(v, list):
            head = [short(x) for x in v[:max_items]]
            return head + ([f"… ({len(v):,} items)"] if len(v) > max_items else [])
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        return v

    return json.dumps(short(row), indent=2, ensure_ascii=False, default=str)


# SPDX identifiers of the licence names a config is likely to use (hub ids are lower-case SPDX).
_SPDX = {
    "apache-2.0": "Apache-2.0",
    "mit": "MIT",
    "cc0-1.0": "CC0-1.0",
    "cc-by-4.0": "CC-BY-4.0",
    "cc-by-3.0": "CC-BY-3.0",
    "cc-by-sa-3.0": "CC-BY-SA-3.0",
    "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "cc-by-nc-4.0": "CC-BY-NC-4.0",
    "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0",
    "odc-by": "ODC-By-1.0",
    "odbl": "ODbL-1.0",
    "pddl": "PDDL-1.0",
    "gpl-3.0": "GPL-3.0-only",
    "gpl-2.0": "GPL-2.0-only",
    "lgpl-3.0": "LGPL-3.0-only",
    "bsd-3-clause": "BSD-3-Clause",
    "bsd-2-clause": "BSD-2-Clause",
    "mpl-2.0": "MPL-2.0",
    "psf-2.0": "PSF-2.0",
    "unlicense": "Unlicense",
}


def licence_url(licence: str) -> str | None:
    """The licence text's address for an SPDX-known licence name; None for anything else."""
    spdx = _SPDX.get(licence.strip().lower())
    return f"https://spdx.org/licenses/{spdx}.html" if spdx else None


def hub_origin(src: dict[str, Any]) -> str | None:
    """The hub page of an `hf` source that names a hub dataset (not a local folder)."""
    from pipeline.output.card.meta import is_hub_id

    dataset = src.get("dataset")
    if src.get("kind") != "hf" or not is_hub_id(dataset):
        return None
    return f"https://huggingface.co/datasets/{dataset}"


def _steps(m: Manifest) -> set[str]:
    """The filter steps that dropped documents in this run (from the audit counts)."""
    out: set[str] = set()
    for c in m.sources.values():
        out.update(c.filtered)
    return out


# BibTeX of the methods Longloom implements, written from the papers' title pages.
BIBTEX: dict[str, str] = {
    "best_fit": r"""@inproceedings{ding2024fewer,
  title     = {Fewer Truncations Improve Language Modeling},
  author    = {Ding, Hantian and Wang, Zijian and Paolini, Giovanni and Kumar, Varun and Deoras, Anoop and Roth, Dan and Soatto, Stefano},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year      = {2024},
  eprint    = {2404.10830},
  archivePrefix = {arXiv}
}""",
    "short_docs": r"""@inproceedings{fu2024data,
  title     = {Data Engineering for Scaling Language Models to 128K Context},
  author    = {Fu, Yao and Panda, Rameswar and Niu, Xinyao and Yue, Xiang and Hajishirzi, Hannaneh and Kim, Yoon and Peng, Hao},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year      = {2024},
  eprint    = {2402.10171},
  archivePrefix = {arXiv}
}""",
    "semdedup": r"""@article{abbas2023semdedup,
  title   = {SemDeDup: Data-efficient learning at web-scale through semantic deduplication},
  author  = {Abbas, Amro and Tirumala, Kushal and Simig, D{\'a}niel and Ganguli, Surya and Morcos, Ari S.},
  journal = {arXiv preprint arXiv:2303.09540},
  year    = {2023}
}""",
    "d4": r"""@inproceedings{tirumala2023d4,
  title     = {D4: Improving LLM Pretraining via Document De-Duplication and Diversification},
  author    = {Tirumala, Kushal and Simig, Daniel and Aghajanyan, Armen and Morcos, Ari S.},
  booktitle = {Advances in Neural Information Processing Systems 36 (NeurIPS), Datasets and Benchmarks Track},
  year      = {2023},
  eprint    = {2308.12284},
  archivePrefix = {arXiv}
}""",
    "ruler": r"""@inproceedings{hsieh2024ruler,
  title     = {RULER: What's the Real Context Size of Your Long-Context Language Models?},
  author    = {Hsieh, Cheng-Ping and Sun, Simeng and Kriman, Samuel and Acharya, Shantanu and Rekesh, Dima and Jia, Fei and Zhang, Yang and Ginsburg, Boris},
  booktitle = {First Conference on Language Modeling (COLM)},
  year      = {2024},
  eprint    = {2404.06654},
  archivePrefix = {arXiv}
}""",
    "hashhop": r"""@misc{magic2024hashhop,
  title        = {HashHop: Long-Context Evaluation},
  author       = {{Magic}},
  year         = {2024},
  howpublished = {\url{https://github.com/magicproduct/hash-hop}}
}""",
}
RULER_TASKS = frozenset({"multi_needle", "variable_tracking", "aggregation", "niah", "common_words"})


def methods_used(m: Manifest, s: CardStats) -> list[str]:
    """Keys of BIBTEX for the methods this run actually used (by its config and the rows it wrote)."""
    cfg = m.config
    used: list[str] = []
    strategies = {t.strategy for t in m.targets} | {(cfg.get("packing") or {}).get("strategy")}
    if "best_fit" in strategies and m.targets:
        used.append("best_fit")
    if any((src.get("short_docs") or {}) for src in cfg.get("sources", [])) and any(
        c.filtered.get("short_doc_downsampled") for c in m.sources.values()
    ):
        used.append("short_docs")
    div = cfg.get("diversity") or {}
    if div.get("embedder"):
        if (div.get("semdedup") or {}).get("enabled"):
            used.append("semdedup")
        if (div.get("d4") or {}).get("keep_fraction"):
            used.append("d4")
    tasks = {t for c in s.chat for t in c.tasks} | {t for e in s.evals for t in e.tasks}
    if tasks & RULER_TASKS:
        used.append("ruler")
    if "hash_chain" in tasks:
        used.append("hashhop")
    return used


def dataset_bibtex(m: Manifest, title: str, repo: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "longloom_dataset"
    where = f"https://huggingface.co/datasets/{repo}" if "/" in repo and not repo.startswith("PATH") else repo
    return "\n".join(
        [
            f"@misc{{{key}_{m.config_hash[:8]},",
            f"  title        = {{{{{title}}}: a long-context dataset built with Longloom}},",
            f"  howpublished = {{\\url{{{where}}}}},",
            f"  note         = {{Longloom {m.longloom_version}, config hash {m.config_hash}}}",
            "}",
        ]
    )


def _q(q: dict[str, Any], key: str) -> Any:
    v = q.get(key)
    return "–" if v is None else round(float(v), 1)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1] if items else ""


def _compact_source(src: dict[str, Any]) -> dict[str, Any]:
    """A source's settings without unset fields, and without code options for non-code sources."""
    return {k: v for k, v in src.items() if v is not None and not (k == "code" and src.get("kind") != "code")}


def _enabled(section: Any) -> bool:
    """A config section worth showing: not an optional stage that is switched off."""
    return not (isinstance(section, dict) and section.get("enabled") is False)
