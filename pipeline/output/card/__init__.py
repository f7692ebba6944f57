"""The dataset card: README.md in Hugging Face form, generated from manifest.json and the rows alone.

Hand-written cards drift from the data they describe; this one is recomputed from the output
folder on every run (and by `longloom card OUT`), and cross-checks the rows against the manifest.

    card = write_card(Path("out/sample"))      # README.md + images/*.png
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import DatasetCardData
from pydantic import ValidationError

from pipeline.core.parquet_io import atomic_path
from pipeline.output.card.body import CardBody, CardCheck, n, pct
from pipeline.output.card.meta import (
    card_metadata,
    config_files,
    dataset_configs,
    include_audit_of,
    licence_shares,
    pretty_name,
    schema_check,
)
from pipeline.output.card.stats import CardStats, Histogram, PretrainStats, TableStats, collect, trimmed
from pipeline.output.plots import Plot, binned, grouped_bars, histogram, stacked_bars
from schemas.manifest import Manifest
from schemas.publish import CardConfig

__all__ = [
    "Card",
    "CardError",
    "dataset_configs",
    "headline_rows",
    "include_audit_of",
    "inline_images",
    "load_manifest",
    "split_front_matter",
    "write_card",
]

IMAGES = "images"


class CardError(ValueError):
    """The output folder cannot be described: no manifest, or one that does not parse."""


@dataclass
class Card:
    """What `write_card` wrote."""

    path: Path
    metadata: dict[str, Any]
    body: str
    plots: list[Plot] = field(default_factory=list)
    checks: list[CardCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def load_manifest(out: Path) -> Manifest:
    path = out / "manifest.json"
    if not path.is_file():
        raise CardError(f"{path}: no manifest; run `longloom build` with output.dir={out} first")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise CardError(f"{path}: not a Longloom manifest ({err.error_count()} errors: {err})") from None


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, Markdown body) of a README.md with `---` front matter."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    return yaml.safe_load(text[4 : end + 1]) or {}, text[end + 5 :]


def write_card(
    out: Path,
    manifest: Manifest | None = None,
    card: CardConfig | None = None,
    *,
    include_audit: bool | None = None,
    readme: Path | None = None,
) -> Card:
    """Write README.md (and images/*.png) for the run in `out`; return what was written.

    `include_audit` (default: the run's `publish.include_audit`) decides whether the audit tables
    are listed as configs; `readme` writes the card elsewhere than `out/README.md` (publish stages a
    card without the audit configs this way, leaving the local one alone).
    """
    out = Path(out)
    manifest = canonical(manifest or load_manifest(out))
    if card is None:
        card = CardConfig.model_validate(manifest.config.get("card") or {})
    if include_audit is None:
        include_audit = include_audit_of(manifest)
    target = readme or out / "README.md"
    if not card.enabled:
        return _write_minimal(target, manifest, include_audit)
    stats = collect(out, manifest)
    for p in stats.pretrain:
        p.sources = {k: p.sources[k] for k in sorted(p.sources, key=_source_key(manifest))}
    configs = config_files(manifest, stats, include_audit)
    plots = draw_plots(out, manifest, stats) if card.plots else {}
    _remove_stale_images(out, plots.values())
    checks = cross_checks(manifest, stats)
    schemas = [schema_check(out, c) for c in configs]
    meta = card_metadata(out, manifest, stats, card, configs)
    body = CardBody(
        manifest,
        stats,
        configs,
        plots,
        licence_shares(manifest, stats),
        checks,
        schemas,
        card,
        pretty_name(manifest, card),
        include_audit,
        out,
    ).render()
    path = _write(target, meta, body)
    all_checks = checks + [CardCheck(f"{s.config} schema", s.ok, s.detail) for s in schemas]
    return Card(path, meta.to_dict(), body, list(plots.values()), all_checks)


# Stages in the order a run executes them; others (from later issues) follow alphabetically.
STAGE_ORDER = (
    "prepare",
    "embed",
    "diversity",
    "prune",
    "select",
    "write",
    "procedural",
    "rewriter",
    "finalize",
)


def _source_key(manifest: Manifest) -> Any:
    order = [s["name"] for s in manifest.config.get("sources", [])]
    return lambda k: (order.index(k) if k in order else len(order), k)


def canonical(manifest: Manifest) -> Manifest:
    """The manifest as manifest.json holds it (keys sorted), with sources in config order and stages in
    run order, so the card is byte-identical whether finalize or `longloom card` writes it."""
    m = Manifest.model_validate_json(json.dumps(manifest.model_dump(mode="json"), sort_keys=True))
    m.sources = {k: m.sources[k] for k in sorted(m.sources, key=_source_key(m))}
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    m.stages = {k: m.stages[k] for k in sorted(m.stages, key=lambda k: (rank.get(k, len(rank)), k))}
    return m


def _write(path: Path, meta: DatasetCardData, body: str) -> Path:
    front = yaml.safe_dump(meta.to_dict(), sort_keys=False, allow_unicode=True, width=1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(f"---\n{front}---\n\n{body}", encoding="utf-8")
    return path


def _write_minimal(path: Path, manifest: Manifest, include_audit: bool) -> Card:
    """`card.enabled: false`: only the `configs:` metadata that lets `datasets` load every config."""
    meta = DatasetCardData(configs=dataset_configs(manifest, include_audit))
    body = (
        f"# {manifest.config.get('run', {}).get('name', 'longloom')} (Longloom output)\n\n"
        f"Built by Longloom {manifest.longloom_version}, config hash `{manifest.config_hash}`; "
        "see `manifest.json`.\n"
    )
    return Card(_write(path, meta, body), meta.to_dict(), body)


def _remove_stale_images(out: Path, keep: Any) -> None:
    """Drop plots an earlier card drew that this one did not (e.g. a synthesized set went away)."""
    wanted = {p.path for p in keep}
    folder = out / IMAGES
    if folder.is_dir():
        for p in sorted(folder.glob("*.png")):
            if f"{IMAGES}/{p.name}" not in wanted:
                p.unlink()


def draw_plots(out: Path, manifest: Manifest, stats: CardStats) -> dict[str, Plot]:
    """The card's figures, each a plot of recounted data."""
    plots: dict[str, Plot] = {}
    if stats.pretrain:
        sources = list(dict.fromkeys(k for p in stats.pretrain for k in p.sources))
        series = {s: [p.sources[s].tokens if s in p.sources else 0 for p in stats.pretrain] for s in sources}
        series["separators"] = [p.separator_tokens for p in stats.pretrain]
        series["padding"] = [p.pad_tokens for p in stats.pretrain]
        plots["tokens_by_source"] = stacked_bars(
            out,
            f"{IMAGES}/tokens_by_source.png",
            "Tokens per config, by source",
            "tokens",
            [p.config_name for p in stats.pretrain],
            series,
        )
        hists: dict[str, Histogram] = {}
        for p in stats.pretrain:
            for name, src in p.sources.items():
                h = hists.setdefault(name, Histogram())
                h.counts = [a + b for a, b in zip(h.counts, src.doc_tokens.counts, strict=True)]
                h.count += src.doc_tokens.count
        edges, counts = trimmed(hists)
        plots["doc_tokens_by_source"] = histogram(
            out,
            f"{IMAGES}/doc_tokens_by_source.png",
            "Document length in the rows, by source",
            "document length (tokens)",
            edges,
            counts,
            ylabel="documents",
        )
    in_rows = stats.source_tokens()
    names = list(manifest.sources)
    if names:
        plots["mixture"] = grouped_bars(
            out,
            f"{IMAGES}/mixture.png",
            "Tokens per source: read, kept after filtering, in the rows",
            "tokens",
            names,
            {
                "read": [manifest.sources[s].tokens_read for s in names],
                "kept": [manifest.sources[s].kept_tokens for s in names],
                "in rows": [in_rows.get(s, 0) for s in names],
            },
        )
    dist: dict[str, Histogram] = {}
    for c in stats.chat:
        for task, t in sorted(c.tasks.items()):
            h = dist.setdefault(task, Histogram())
            h.counts = [a + b for a, b in zip(h.counts, t.dependency_distance.counts, strict=True)]
            h.count += t.dependency_distance.count
    if any(h.count for h in dist.values()):
        edges, counts = trimmed(dist)
        plots["dependency_distance"] = histogram(
            out,
            f"{IMAGES}/dependency_distance.png",
            "Dependency distance of synthesized samples, by task",
            "tokens between the farthest needed evidence and the question",
            edges,
            counts,
            ylabel="samples",
        )
    plots.update(procedural_plots(out, manifest))
    plots.update(long_dependency_plots(out, manifest))
    return plots


def long_dependency_plots(out: Path, manifest: Manifest) -> dict[str, Plot]:
    """Score distributions of the long_dependency stage: documents per source, packed rows per target."""
    ld = manifest.extra.get("long_dependency")
    if not isinstance(ld, dict) or not isinstance(ld.get("bins"), list):
        return {}
    labels = [str(b) for b in ld["bins"]]
    plots: dict[str, Plot] = {}
    for key, group, title, ylabel in (
        (
            "long_dependency_by_source",
            "by_source",
            "Long-range dependency of documents, by source",
            "documents",
        ),
        ("long_dependency_by_target", "by_target", "Long-range dependency of packed rows, by target", "rows"),
    ):
        series = {
            name: [int(x) for x in v["histogram"]]
            for name, v in sorted((ld.get(group) or {}).items())
            if isinstance(v, dict)
            and isinstance(v.get("histogram"), list)
            and len(v["histogram"]) == len(labels)
        }
        if series:
            xlabel = "score: gain of the far context (nats/token)"
            plots[key] = binned(out, f"{IMAGES}/{key}.png", title, xlabel, labels, series, ylabel=ylabel)
    return plots


TENTHS = [f"{i / 10:.1f}–{(i + 1) / 10:.1f}" for i in range(10)]


def procedural_plots(out: Path, manifest: Manifest) -> dict[str, Plot]:
    """The procedural stage's histograms (ten bins of [0, 1] per task), drawn instead of printed as lists."""
    tasks = (manifest.extra.get("procedural") or {}).get("tasks") or {}
    if not isinstance(tasks, dict):
        return {}
    plots: dict[str, Plot] = {}
    for key, field_name, title, xlabel, ylabel in (
        (
            "procedural_distance",
            "dependency_distance_histogram",
            "Procedural questions: dependency distance as a share of the target length, by task",
            "dependency distance / target length",
            "questions",
        ),
        (
            "procedural_depth",
            "evidence_depth_histogram",
            "Procedural evidence: depth in the context, by task",
            "depth (0 = start of the context, 1 = its end)",
            "pieces",
        ),
    ):
        series = {
            label: [int(x) for x in t[field_name]]
            for label, t in sorted(tasks.items())
            if isinstance(t, dict)
            and isinstance(t.get(field_name), list)
            and len(t[field_name]) == len(TENTHS)
        }
        if series:
            plots[key] = binned(out, f"{IMAGES}/{key}.png", title, xlabel, TENTHS, series, ylabel=ylabel)
    return plots


def cross_checks(manifest: Manifest, stats: CardStats) -> list[CardCheck]:
    """The recount against the manifest: a bookkeeping bug or a changed file shows up here."""
    checks = [_target_check(manifest, p) for p in stats.pretrain]
    in_rows = stats.source_tokens()
    for name, src in manifest.sources.items():
        checks.append(
            CardCheck(
                f"`{name}`: document tokens in rows",
                in_rows.get(name, 0) == src.packed_tokens,
                f"rows say {n(in_rows.get(name, 0))}; manifest says {n(src.packed_tokens)}",
            )
        )
    checks += [_audit_check(manifest, a) for a in stats.audit if a.name in ("filtered", "quarantine")]
    for name, rows, what in [(c.config_name, c.rows, "samples") for c in stats.chat] + [
        (e.config_name, e.rows, "questions") for e in stats.evals
    ]:
        listed = sum(e.rows for e in manifest.extra_configs.get(name, []))
        checks.append(
            CardCheck(f"`{name}`: {what}", rows == listed, f"rows say {n(rows)}; manifest says {n(listed)}")
        )
    return checks


def _target_check(manifest: Manifest, p: PretrainStats) -> CardCheck:
    t = next(t for t in manifest.targets if t.config_name == p.config_name)
    recount = (p.rows, p.tokens, p.content_tokens, p.pad_tokens)
    recorded = (t.rows, t.tokens, t.content_tokens, t.pad_tokens)
    return CardCheck(
        f"`{p.config_name}`: rows, tokens, document tokens, padding",
        recount == recorded and set(p.lengths) <= {t.target_length},
        f"rows say {', '.join(n(x) for x in recount)}; manifest says {', '.join(n(x) for x in recorded)}",
    )


def _audit_check(manifest: Manifest, a: TableStats) -> CardCheck:
    """Rows of the filtered/quarantine table per (source, reason) against the manifest's counts."""
    in_table: Counter[tuple[str, str]] = Counter()
    for (src, _step, reason), k in a.by_reason.items():
        in_table[(src, reason)] += k
    counted: Counter[tuple[str, str]] = Counter()
    for name, src_counts in manifest.sources.items():
        per_reason = src_counts.filtered if a.name == "filtered" else src_counts.quarantined
        for reason, k in per_reason.items():
            counted[(name, reason)] += k
    return CardCheck(
        f"`audit_{a.name}` rows by source and reason",
        +in_table == +counted,
        f"{n(sum(in_table.values()))} rows in the table, {n(sum(counted.values()))} in the manifest",
    )


def inline_images(out: Path, markdown: str) -> str:
    """The card body with every `images/*.png` link replaced by a data URI of the file.

    Prefect's UI renders an artifact's Markdown outside the output folder, so relative links show
    as broken images there; embedded, the plots travel with the artifact (a few tens of KB each).
    """
    import base64
    import re

    def embed(m: re.Match[str]) -> str:
        path = out / m.group(2)
        if not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\((images/[^)\s]+\.png)\)", embed, markdown)


def headline_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The headline figures of a run, one dict per config and per source (the Prefect table artifact)."""
    total = sum(t.tokens for t in manifest.targets)
    rows: list[dict[str, Any]] = []
    for t in manifest.targets:
        rows.append(
            {
                "item": t.config_name,
                "kind": f"rows of {t.target_length} tokens",
                "rows": t.rows,
                "tokens": t.tokens,
                "share": pct(t.tokens, total),
                "documents": t.documents,
                "padding": pct(t.pad_tokens, t.tokens),
            }
        )
    for name, files in manifest.extra_configs.items():
        rows.append(
            {
                "item": name,
                "kind": "synthesized set",
                "rows": sum(e.rows for e in files),
                "tokens": None,
                "share": None,
                "documents": None,
                "padding": None,
            }
        )
    packed = sum(c.packed_tokens for c in manifest.sources.values())
    for name, c in manifest.sources.items():
        rows.append(
            {
                "item": f"source {name}",
                "kind": "document tokens in rows",
                "rows": None,
                "tokens": c.packed_tokens,
                "share": pct(c.packed_tokens, packed),
                "documents": c.kept,
                "padding": None,
            }
        )
    return rows
