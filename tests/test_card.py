"""The dataset card: generated from the manifest and rows of a real run, checked against a recount."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from pipeline.core.parquet_io import sha256_file
from pipeline.output.card import split_front_matter, write_card
from pipeline.output.card.stats import EDGES
from pipeline.output.plots import PNG_DATA_KEY
from schemas.config import BuildConfig
from schemas.manifest import FileEntry, Manifest
from schemas.publish import CardConfig
from schemas.records import CHAT_SCHEMA, row_schema
from tests.conftest import ROOT, make_config

# --- helpers -------------------------------------------------------------------------------------------


def md_tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """Markdown tables by the heading they sit under: heading -> [table -> [row as {header: cell}]]."""
    out: dict[str, list[list[dict[str, str]]]] = {}
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            headers = [h.strip() for h in line.strip("|").split(" | ")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                cells = [c.strip() for c in re.split(r"(?<!\\) \| ", lines[i].strip()[2:-2])]
                rows.append(dict(zip(headers, cells, strict=True)))
                i += 1
            out.setdefault(heading, []).append(rows)
            continue
        i += 1
    return out


def num(cell: str) -> int:
    return int(cell.replace(",", "").strip("`"))


def name(cell: str) -> str:
    return cell.strip("`")


def recount(out: Path, manifest: Manifest) -> dict[str, Any]:
    """Figures recomputed from the Parquet rows with plain Python, independently of pipeline.output.card."""
    configs: dict[str, dict[str, Any]] = {}
    docs: dict[str, list[int]] = {}  # source -> lengths of the documents in the rows (first pieces)
    for t in manifest.targets:
        rows = pa.concat_tables([pq.read_table(out / s.path) for s in t.shards]).to_pylist()
        c: dict[str, Any] = {
            "rows": len(rows),
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "pad": sum(r["n_pad"] for r in rows),
            "segments": sum(len(r["segments"]) for r in rows),
            "separators": sum(s["separator_after"] for r in rows for s in r["segments"]),
            "by_source": Counter(),
            "documents": 0,
            "split": 0,
        }
        for r in rows:
            for s in r["segments"]:
                c["by_source"][s["source"]] += s["row_token_end"] - s["row_token_start"]
                if s["part"] == 0:
                    c["documents"] += 1
                    c["split"] += s["is_split"]
                    docs.setdefault(s["source"], []).append(s["doc_tokens"])
        c["content"] = sum(c["by_source"].values())
        configs[t.config_name] = c
    filtered = pq.read_table(out / "audit/filtered").to_pylist()
    drop_tokens: Counter[tuple[str, str]] = Counter()
    for r in filtered:
        drop_tokens[(r["source"], r["reason"])] += r["n_tokens"]
    return {
        "configs": configs,
        "docs": docs,
        "source_tokens": sum((c["by_source"] for c in configs.values()), Counter()),
        "drops": Counter((r["source"], r["reason"]) for r in filtered),
        "drop_tokens": drop_tokens,
    }


def png_data(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[PNG_DATA_KEY])


@pytest.fixture(scope="module")
def run(sample_build_without_procedural: tuple[BuildConfig, Manifest]) -> tuple[BuildConfig, Manifest, Path]:
    # procedural samples off: the synthetic-set tests below add a chat config of their own
    # (the session's build, conftest; read-only: tests that change files copy them first)
    cfg, manifest = sample_build_without_procedural
    return cfg, manifest, Path(cfg.output.dir)


@pytest.fixture(scope="module")
def counted(run: tuple[BuildConfig, Manifest, Path]) -> dict[str, Any]:
    _, manifest, out = run
    return recount(out, manifest)


# --- the card of a real run ------------------------------------------------------------------------------


def test_card_figures_match_the_rows(
    run: tuple[BuildConfig, Manifest, Path], counted: dict[str, Any]
) -> None:
    _, manifest, out = run
    body = split_front_matter((out / "README.md").read_text())[1]
    tables = md_tables(body)
    rc = counted["configs"]

    total_rows = sum(c["rows"] for c in rc.values())
    total_tokens = sum(c["tokens"] for c in rc.values())
    assert f"{total_rows:,} rows holding {total_tokens:,} tokens" in body
    assert "16,384 and 65,536 tokens per row" in body

    contents = {name(r["Config"]): r for r in tables["Configs"][0]}
    for cfg_name, c in rc.items():
        assert num(contents[cfg_name]["Rows"]) == c["rows"]
        assert num(contents[cfg_name]["Tokens"]) == c["tokens"]
    assert num(contents["audit_filtered"]["Rows"]) == sum(counted["drops"].values())

    main, per_source = tables["Pretraining rows"][0], tables["Tokens per source"][0]
    for r in main:
        c = rc[name(r["Config"])]
        assert num(r["Rows"]) == c["rows"] and num(r["Tokens"]) == c["tokens"]
        assert num(r["Document tokens"]) == c["content"]
        assert num(r["Separators"]) == c["separators"] and num(r["Padding"]) == c["pad"]
        assert num(r["Documents"]) == c["documents"] and num(r["Split documents"]) == c["split"]
        assert num(r["Segments"]) == c["segments"]
        assert c["content"] + c["separators"] + c["pad"] == c["tokens"]
    for r in per_source:
        c = rc[name(r["Config"])]
        for col, cell in r.items():
            if col != "Config":
                assert num(cell) == c["by_source"].get(name(col), 0), (r["Config"], col)

    lengths = {name(r["Source"]): r for r in tables["Document lengths"][0]}
    for src, docs in counted["docs"].items():
        assert num(lengths[src]["Documents"]) == len(docs)
        assert num(lengths[src]["Longest"]) == max(docs)
        assert float(lengths[src]["Mean tokens"].replace(",", "")) == pytest.approx(np.mean(docs), abs=0.06)

    mixture = {name(r["Source"]): r for r in tables["Source mixture before and after filtering"][0]}
    for src, c in manifest.sources.items():
        assert num(mixture[src]["Tokens in rows"]) == counted["source_tokens"][src] == c.packed_tokens
        assert num(mixture[src]["Records read"]) == c.records_read
        assert num(mixture[src]["Tokens read"]) == c.tokens_read
        assert num(mixture[src]["Documents dropped"]) == sum(
            v for (s, _), v in counted["drops"].items() if s == src
        )
    shares = [float(r["Share in rows"].rstrip("%")) for r in mixture.values()]
    assert sum(shares) == pytest.approx(100, abs=0.3)

    drops = Counter()
    drop_tokens = Counter()
    for r in tables["Drops by reason"][0]:
        drops[(name(r["Source"]), r["Reason"])] += num(r["Documents"])
        drop_tokens[(name(r["Source"]), r["Reason"])] += num(r["Tokens"])
    assert drops == counted["drops"] and drop_tokens == counted["drop_tokens"]
    assert {"source_budget", "short_doc_downsampled", "exact_duplicate"} <= {k[1] for k in drops}


def test_card_says_how_it_was_built(run: tuple[BuildConfig, Manifest, Path]) -> None:
    cfg, manifest, out = run
    body = split_front_matter((out / "README.md").read_text())[1]
    assert f"Config hash: `{manifest.config_hash}`" in body
    assert "```bash\nlongloom build data/sample.yaml\n```" in body
    # issue 12.25: no install command for a package index release that does not exist
    assert "pip install longloom==" not in body.replace("no `pip install longloom==", "")
    assert "pip install -e ." in body and "pypi.org" not in body
    assert f"Seed: `{cfg.run.seed}`" in body and manifest.tokenizer.vocab_hash in body
    stages = {r["Stage"]: r for r in md_tables(body)["Stages that ran"][0]}
    assert set(stages) == set(manifest.stages) == {"prepare", "select", "write"}
    assert num(stages["prepare"]["Items in"]) == sum(c.records_read for c in manifest.sources.values())
    inputs = md_tables(body)["Rebuilding it"][0]
    assert {(name(r["Input"]), name(r["Revision"])) for r in inputs} == {
        (i.uri, i.revision) for i in manifest.inputs
    }
    assert "strategy: best_fit" in body and "below_tokens: 64" in body  # stage parameters
    checks = md_tables(body)["Checks"][0]
    assert checks and all(r["Result"] == "ok" for r in checks)
    limits = body.split("## Known limitations", 1)[1]
    pad = sum(t.pad_tokens for t in manifest.targets)
    assert f"{pad:,} of" in limits and "exact (content hash) only" in limits


def test_card_metadata_parses_with_datasets_and_the_hub_client(
    run: tuple[BuildConfig, Manifest, Path],
) -> None:
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    _, manifest, out = run
    card = DatasetCard.load(out / "README.md")
    data = card.data
    configs = MetadataConfigs.from_dataset_card_data(data)
    assert list(configs) == ["pretrain_16384", "pretrain_65536", "audit_filtered"]  # quarantine is empty
    assert configs["pretrain_16384"]["default"] is True
    infos = DatasetInfosDict.from_dataset_card_data(data)
    for t in manifest.targets:
        assert infos[t.config_name].splits["train"].num_examples == t.rows
        # the default output.boundary_columns: cu_seqlens only (position_ids follows from it)
        want = row_schema(True, ["cu_seqlens"])
        assert infos[t.config_name].features == datasets.Features.from_arrow_schema(want)
        assert infos[t.config_name].download_size == sum(s.bytes for s in t.shards)
    assert data.license == ["cc-by-sa-4.0", "other"] and data.license_name == "psf-2.0-and-public-domain"
    assert data.language == ["code", "en"]
    assert data.size_categories == ["n<1K"] and data.task_categories == ["text-generation"]
    assert "long-context" in data.tags and data.pretty_name == "longloom-sample"
    licences = {r["Licence"]: r for r in md_tables(card.text)["Licences"][0]}
    assert num(licences["public-domain"]["Tokens in rows"]) == (
        manifest.sources["books"].packed_tokens + manifest.sources["bible"].packed_tokens
    )


def test_every_config_loads_with_datasets(run: tuple[BuildConfig, Manifest, Path]) -> None:
    _, manifest, out = run
    meta, _ = split_front_matter((out / "README.md").read_text())
    for entry in meta["configs"]:
        ds = datasets.load_dataset(str(out), entry["config_name"], split="train")
        files = sorted((out / entry["data_files"][0]["path"]).parent.glob("*.parquet"))
        assert ds.num_rows == sum(pq.ParquetFile(f).metadata.num_rows for f in files) > 0
    assert datasets.load_dataset(str(out), split="train").num_rows == manifest.targets[0].rows


def test_images_are_real_plots_of_the_rows(
    run: tuple[BuildConfig, Manifest, Path], counted: dict[str, Any]
) -> None:
    _, manifest, out = run
    body = (out / "README.md").read_text()
    linked = re.findall(r"\]\((images/[^)]+\.png)\)", body)
    assert sorted(linked) == [
        "images/doc_tokens_by_source.png",
        "images/mixture.png",
        "images/tokens_by_source.png",
    ]
    for rel in linked:
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.width == 900 and im.height >= 480
            colours = len(set(im.convert("RGB").getdata()))
            assert colours > 50, f"{rel} looks blank ({colours} colours)"

    bars = png_data(out / "images/tokens_by_source.png")
    for i, cfg_name in enumerate(bars["categories"]):
        c = counted["configs"][cfg_name]
        stacked = sum(v[i] for v in bars["series"].values())
        assert stacked == bars["totals"][cfg_name] == c["tokens"]  # every token of the config is drawn
        assert bars["series"]["padding"][i] == c["pad"]

    hist = png_data(out / "images/doc_tokens_by_source.png")
    edges = hist["edges"]
    assert set(edges) <= set(EDGES)
    for src, lengths in counted["docs"].items():
        expected, _ = np.histogram(lengths, bins=edges)  # the last bin of np.histogram is closed; fine here
        assert hist["series"][src] == expected.tolist()
        assert hist["totals"][src] == len(lengths)

    mix = png_data(out / "images/mixture.png")
    assert mix["series"]["read"] == [manifest.sources[s].tokens_read for s in mix["categories"]]
    assert mix["series"]["in rows"] == [counted["source_tokens"][s] for s in mix["categories"]]


def test_card_is_reproducible_and_cannot_drift(
    run: tuple[BuildConfig, Manifest, Path], tmp_path: Path
) -> None:
    _, manifest, src = run
    out = tmp_path / "copy"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".longloom"))
    before = {
        p.relative_to(out): p.read_bytes() for p in [out / "README.md", *(out / "images").glob("*.png")]
    }
    card = write_card(out)
    assert card.ok
    after = {p.relative_to(out): p.read_bytes() for p in [out / "README.md", *(out / "images").glob("*.png")]}
    assert after == before  # same data, same bytes: a re-publish uploads nothing

    # A manifest that no longer matches its rows (a hand edit, a bookkeeping bug) shows up in the card.
    doctored = manifest.model_copy(deep=True)
    doctored.targets[0].rows += 1
    doctored.sources["wiki"].packed_tokens *= 10
    (out / "manifest.json").write_text(doctored.model_dump_json())
    card = write_card(out)
    failed = {c.name for c in card.checks if not c.ok}
    assert failed == {
        "`pretrain_16384`: rows, tokens, document tokens, padding",
        "`wiki`: document tokens in rows",
    }
    text = (out / "README.md").read_text()
    assert "| FAILED |" in text and "consistency checks FAILED" in text
    rows_cell = md_tables(text)["Configs"][0][0]["Rows"]
    assert num(rows_cell) == manifest.targets[0].rows  # the card prints the recount, not the claim


def test_card_disabled_keeps_only_the_configs(
    run: tuple[BuildConfig, Manifest, Path], tmp_path: Path
) -> None:
    _, manifest, src = run
    out = tmp_path / "copy"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".longloom"))
    card = write_card(out, card=CardConfig(enabled=False))
    meta, body = split_front_matter(card.path.read_text())
    assert list(meta) == ["configs"] and manifest.config_hash in body
    assert (
        datasets.load_dataset(str(out), "pretrain_65536", split="train").num_rows == manifest.targets[1].rows
    )


def test_card_config_adds_title_text_tags_and_limitations(
    run: tuple[BuildConfig, Manifest, Path], tmp_path: Path
) -> None:
    _, _, src = run
    out = tmp_path / "copy"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".longloom"))
    cfg = CardConfig(
        pretty_name="Long Sample",
        description="Made for a test.",
        tags=["demo"],
        limitations=["Tiny; for smoke tests only."],
    )
    card = write_card(out, card=cfg)
    assert card.metadata["pretty_name"] == "Long Sample" and "demo" in card.metadata["tags"]
    assert card.body.startswith("# Long Sample\n") and "\nMade for a test.\n" in card.body
    assert "- Tiny; for smoke tests only." in card.body.split("## Known limitations")[1]


# --- synthesized sets, optional stages, and the command line ------------------------------------------


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Chat samples in CHAT_SCHEMA with a known task mix, dependency distances and models."""
    rng = np.random.default_rng(7)
    tasks = ["hash_chain", "multi_needle", "chunk_qa"]
    rows = []
    for i in range(n):
        task = tasks[i % 3]
        dist = int(rng.integers(100, 60_000))
        model = (
            {
                "model": "gemma-3-270m",
                "endpoint_host": "127.0.0.1",
                "template": "chunk_qa",
                "template_version": "2",
                "prompt_hash": "ab12cd34",
                "sampling": "{}",
            }
            if task == "chunk_qa"
            else None
        )
        rows.append(
            {
                "sample_id": f"s{i}",
                "task": task,
                "generator": f"{task}@1",
                "seed": i,
                "params": "{}",
                "messages": [
                    {"role": "user", "content": "context ..."},
                    {"role": "assistant", "content": "a"},
                ],
                "chat_template": "llama3",
                "target_length": 65536,
                "length": 65536,
                "length_counts": "full_chat",
                "context_tokens": 65000 + i,
                "evidence": [],
                "questions": [],
                "dependency_distance": dist,
                "haystack": [],
                "model": model,
                "lineage": {
                    "config_hash": "x",
                    "tokenizer": "t",
                    "tokenizer_hash": "h",
                    "longloom_version": "0",
                    "seed": 0,
                    "steps": [],
                },
            }
        )
    return rows


def add_optional_stages(out: Path, manifest: Manifest) -> tuple[Manifest, list[dict[str, Any]]]:
    """What issues 3-5 hand to finalize: a chat set, a `pruned` audit table and stage statistics."""
    rows = chat_rows(30)
    path = out / "data/synth_chat/train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CHAT_SCHEMA), path)
    pruned = out / "audit/pruned/pruned-00000-of-00001.parquet"
    pruned.parent.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "source": ["wiki"] * 5 + ["books"],
                "reason": ["semantic_duplicate"] * 5 + ["diversity"],
                "step": ["semdedup@1"] * 5 + ["d4@1"],
                "n_tokens": [10, 20, 30, 40, 50, 1000],
                "similarity": [0.97] * 6,
            }
        ),
        pruned,
    )
    m = manifest.model_copy(deep=True)

    def entry(p: Path, n: int) -> FileEntry:
        return FileEntry(path=str(p.relative_to(out)), sha256=sha256_file(p), bytes=p.stat().st_size, rows=n)

    m.extra_configs["synth_chat"] = [entry(path, len(rows))]
    m.audit["pruned"] = [entry(pruned, 6)]
    m.extra = {
        "diversity": {
            "embedder": "minilm",
            "pruned": {"semantic_duplicate": 5, "diversity": 1},
            "clusters": 12,
        },
        "rewriter": {"requested": 40, "accepted": 10, "rejected": {"evidence_not_found": 25, "too_local": 5}},
        "some_future_stage": {"widgets": 3, "per_source": {"wiki": {"kept": 4, "dropped": 1}}},
    }
    (out / "manifest.json").write_text(m.model_dump_json())
    return m, rows


def test_synthetic_sets_and_stage_statistics_show_in_the_card(
    run: tuple[BuildConfig, Manifest, Path], tmp_path: Path
) -> None:
    _, manifest, src = run
    out = tmp_path / "copy"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".longloom"))
    m, rows = add_optional_stages(out, manifest)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "card", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "recounts agree" in proc.stdout
    meta, body = split_front_matter((out / "README.md").read_text())
    tables = md_tables(body)

    assert [c["config_name"] for c in meta["configs"]] == [
        "pretrain_16384",
        "pretrain_65536",
        "synth_chat",
        "audit_filtered",
        "audit_pruned",
    ]
    assert "synthetic" in meta["tags"] and "question-answering" in meta["task_categories"]
    mix = {r["Task"]: r for r in tables["Task mix"][0]}
    for task in ("hash_chain", "multi_needle", "chunk_qa"):
        mine = [r for r in rows if r["task"] == task]
        assert num(mix[task]["Samples"]) == len(mine)
        assert num(mix[task]["Max dependency distance"]) == max(r["dependency_distance"] for r in mine)
        assert num(mix[task]["Context tokens"]) == sum(r["context_tokens"] for r in mine)
        assert mix[task]["Generators"] == f"{task}@1 ({len(mine)})"
    models = tables["Rewriter models and prompt templates"][0]
    assert (
        len(models) == 1 and name(models[0]["Prompt hash"]) == "ab12cd34" and num(models[0]["Samples"]) == 10
    )

    dist = png_data(out / "images/dependency_distance.png")
    for task in mix:
        values = [r["dependency_distance"] for r in rows if r["task"] == task]
        assert dist["series"][task] == np.histogram(values, bins=dist["edges"])[0].tolist()

    drops = {(r["Stage"], name(r["Source"]), r["Reason"]): r for r in tables["Drops by reason"][0]}
    assert num(drops[("pruned", "wiki", "semantic_duplicate")]["Documents"]) == 5
    assert num(drops[("pruned", "wiki", "semantic_duplicate")]["Tokens"]) == 150
    # statistics of stages the card module knows nothing about still show, as tables
    assert "| evidence_not_found | 25 |" in body and "| clusters | 12 |" in body
    assert "### `some_future_stage`" in body and "| wiki | 1 | 4 |" in body
    assert datasets.load_dataset(str(out), "synth_chat", split="train").num_rows == 30

    # the synthesized set going away removes its plot too
    m.extra_configs.clear()
    (out / "manifest.json").write_text(m.model_dump_json())
    write_card(out)
    assert not (out / "images/dependency_distance.png").exists()


def test_cli_card_errors_name_the_problem(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "card", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no manifest" in proc.stderr and str(tmp_path) in proc.stderr


# --- the flow writes the card and attaches it to the run ------------------------------------------------


def test_flow_run_attaches_the_card_as_artifacts(tmp_path: Path, prefect_harness: None) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.build import build, task_runner_for
    from pipeline.output.card import inline_images

    cfg = make_config(tmp_path / "out")
    state = build.with_options(task_runner=task_runner_for(cfg))(cfg, return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    found = {a.type: a for a in asyncio.run(artifacts())}
    readme = (tmp_path / "out/README.md").read_text()
    assert found["markdown"].key == "longloom-sample-card"
    assert found["markdown"].data == inline_images(tmp_path / "out", split_front_matter(readme)[1])
    assert "](images/" not in found["markdown"].data and "data:image/png;base64," in found["markdown"].data
    table = found["table"].data
    table = json.loads(table) if isinstance(table, str) else table
    manifest = Manifest.model_validate_json((tmp_path / "out/manifest.json").read_text())
    by_item = {r["item"]: r for r in table}
    for t in manifest.targets:
        assert by_item[t.config_name]["rows"] == t.rows and by_item[t.config_name]["tokens"] == t.tokens


@pytest.fixture(scope="module")
def proc_run(sample_build: tuple[BuildConfig, Manifest]) -> tuple[Manifest, Path]:
    """The bundled sample run as it ships: procedural samples and their evaluation export included
    (the session's build, conftest; read-only)."""
    cfg, manifest = sample_build
    return manifest, Path(cfg.output.dir)


def test_card_of_a_run_with_procedural_samples(proc_run: tuple[Manifest, Path]) -> None:
    """The bundled sample run writes procedural chat samples: the card lists and plots them."""
    manifest, out = proc_run
    body = (out / "README.md").read_text()
    meta, _ = split_front_matter(body)
    names = [c["config_name"] for c in meta["configs"]]
    assert "procedural" in names and "procedural_eval" in names
    assert "images/dependency_distance.png" in body
    samples = datasets.load_dataset(str(out), "procedural", split="train")
    assert samples.num_rows == sum(e.rows for e in manifest.extra_configs["procedural"])
    assert str(max(samples["dependency_distance"])) in body.replace(",", "")


def test_card_counts_questions_apart_from_samples(proc_run: tuple[Manifest, Path]) -> None:
    """Issue 12.21: evaluation rows are questions, not samples; their tokens are prompt tokens."""
    _, out = proc_run
    chat = pq.read_table(out / "data/procedural").to_pylist()
    evals = pq.read_table(out / "data/procedural_eval").to_pylist()
    assert len(evals) > len(chat)  # several questions per multi_needle sample
    body = split_front_matter((out / "README.md").read_text())[1]
    tables = md_tables(body)
    assert f"{len(chat):,} synthesized chat samples" in body
    assert f"{len(evals):,} evaluation questions" in body
    configs = {name(r["Config"]): r for r in tables["Configs"][0]}
    assert num(configs["procedural"]["Rows"]) == len(chat)
    assert num(configs["procedural"]["Tokens"]) == sum(r["length"] for r in chat)
    assert num(configs["procedural_eval"]["Rows"]) == len(evals)
    assert num(configs["procedural_eval"]["Tokens"]) == sum(r["prompt_tokens"] for r in evals) > 0

    mix = tables["Task mix"][0]
    assert {name(r["Config"]) for r in mix} == {"procedural"}
    per_task = Counter(r["task"] for r in chat)
    assert {r["Task"]: num(r["Samples"]) for r in mix} == dict(per_task)
    questions = {r["Task"]: r for r in tables["Evaluation questions"][0]}
    for task in per_task:
        mine = [r for r in evals if r["task"] == task]
        assert num(questions[task]["Questions"]) == len(mine)
        assert num(questions[task]["Samples asked about"]) == len({r["sample_id"] for r in mine})
        assert num(questions[task]["Prompt tokens"]) == sum(r["prompt_tokens"] for r in mine)

    dist = png_data(out / "images/dependency_distance.png")
    assert dist["totals"] == dict(per_task)  # one count per sample, not per sample + question
    for task in per_task:
        values = [r["dependency_distance"] for r in chat if r["task"] == task]
        assert dist["series"][task] == np.histogram(values, bins=dist["edges"])[0].tolist()


def test_procedural_section_is_tables_and_plots(proc_run: tuple[Manifest, Path]) -> None:
    """Issue 12.23: no JSON dumps, no deep headings; histograms are plots of the samples' evidence."""
    _, out = proc_run
    body = split_front_matter((out / "README.md").read_text())[1]
    section = body.split("### Procedural generation", 1)[1].split("\n## ", 1)[0]
    assert "```" not in section and "\n#####" not in section
    assert len(section.splitlines()) < 80
    chat = pq.read_table(out / "data/procedural").to_pylist()
    tasks = {r["Task"]: r for r in md_tables(section)["Dependency distance per task"][0]}
    for task in {r["task"] for r in chat}:
        dists = [q["dependency_distance"] for r in chat if r["task"] == task for q in r["questions"]]
        assert num(tasks[task]["Questions"]) == len(dists)
        assert float(tasks[task]["Max"].replace(",", "")) == max(dists)
        assert float(tasks[task]["Min (tokens)"].replace(",", "")) == min(dists)
    depth = png_data(out / "images/procedural_depth.png")
    for task in {r["task"] for r in chat}:
        depths = [e["depth"] for r in chat if r["task"] == task for e in r["evidence"]]
        want = np.histogram(np.clip(depths, 0, 1), bins=10, range=(0, 1))[0].tolist()
        assert depth["series"][task] == want
    assert "images/procedural_depth.png" in section and "images/procedural_distance.png" in section


def test_dataset_info_is_what_datasets_records(proc_run: tuple[Manifest, Path], tmp_path: Path) -> None:
    """Issue 12.24: num_bytes/dataset_size/download_size equal what `datasets` computes on loading."""
    from datasets.info import DatasetInfosDict

    _, out = proc_run
    card = DatasetCard.load(out / "README.md")
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    assert set(infos) >= {"pretrain_16384", "procedural", "procedural_eval", "audit_filtered"}
    for config, info in infos.items():
        # the README's dataset_info must not feed the figures back: load the files without it
        files = sorted(
            str(p)
            for p in (out / ("audit" if config.startswith("audit_") else "data")).glob(
                f"{config.removeprefix('audit_')}/*.parquet"
            )
        )
        ds = datasets.load_dataset(
            "parquet", data_files=files, split="train", cache_dir=str(tmp_path / config)
        )
        assert info.splits["train"].num_bytes == ds.info.splits["train"].num_bytes, config
        assert info.dataset_size == ds.info.dataset_size, config
        assert info.download_size == ds.info.download_size == sum(Path(f).stat().st_size for f in files)
        assert info.splits["train"].num_examples == ds.num_rows


def test_data_fields_usage_citation_and_sources(proc_run: tuple[Manifest, Path]) -> None:
    """Issue 12.22: every column explained, a usage snippet that runs, citations of what was used."""
    manifest, out = proc_run
    meta, body = split_front_matter((out / "README.md").read_text())
    fields = body.split("## Data fields", 1)[1].split("\n## ", 1)[0]
    assert "(not documented)" not in fields
    for entry in meta["configs"]:
        first = sorted((out / entry["data_files"][0]["path"]).parent.glob("*.parquet"))[0]
        for col in pq.read_schema(first).names:
            assert f"| `{col}` |" in fields, (entry["config_name"], col)
    assert fields.count("An example row") >= 4

    # the usage snippet runs as printed (the repo id swapped for this folder)
    code = body.split("## Using the data", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "streaming=True" in code
    scope: dict[str, Any] = {}
    exec(code.replace('"PATH/TO/THIS/FOLDER"', repr(str(out))), scope)
    row = pq.read_table(next((out / "data/pretrain_16384").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    bounds = sorted({0, row["length"]} | {s["row_token_start"] for s in row["segments"]})
    if row["n_pad"]:
        bounds = sorted(set(bounds) | {row["length"] - row["n_pad"]})
    assert scope["cu_seqlens"].tolist() == bounds
    pos = scope["position_ids"]
    for s in row["segments"]:
        assert (
            pos[s["row_token_start"]] == 0
            and pos[s["row_token_end"] - 1] == s["row_token_end"] - 1 - s["row_token_start"]
        )

    cite = body.split("## Citation", 1)[1]
    for key in ("ding2024fewer", "hsieh2024ruler", "magic2024hashhop", "fu2024data"):
        assert key in cite
    assert "abbas2023semdedup" not in cite and "tirumala2023d4" not in cite  # no embedder in the sample
    assert manifest.config_hash in cite
    sources = {name(r["Source"]): r for r in md_tables(body)["Sources"][0]}
    assert set(sources) == set(manifest.sources)
    assert "https://spdx.org/licenses/CC-BY-SA-4.0.html" in sources["wiki"]["Licence"]
    for heading in (
        "## Personal and sensitive information",
        "## Bias and representativeness",
        "## Known limitations",
    ):
        assert heading in body


def test_artifact_markdown_embeds_the_plots(proc_run: tuple[Manifest, Path]) -> None:
    """Issue 12.26: the Prefect artifact carries its images (data URIs), not relative links."""
    import base64

    from pipeline.output.card import inline_images

    _, out = proc_run
    body = split_front_matter((out / "README.md").read_text())[1]
    linked = re.findall(r"\]\((images/[^)]+\.png)\)", body)
    assert linked
    inlined = inline_images(out, body)
    assert "](images/" not in inlined
    uris = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inlined)
    assert [base64.b64decode(u) for u in uris] == [(out / p).read_bytes() for p in linked]
