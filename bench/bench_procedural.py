"""Benchmark: procedural sample generation time per sample at 64K, 256K and 1M tokens.

    PYTHONPATH=. python bench/bench_procedural.py [--rows OUT_DIR] [--samples N] [--new-only | --evidence-only]

Haystacks are real packed rows: without --rows, the bundled sample config is built first (about 10 s)
into a temporary folder. Each sample goes through the stage's own path (rows -> haystack -> draft ->
token-exact chat -> verification by one full tokenization). Printed per target length: seconds per
sample (mean over tasks and samples) and where the time goes; then, for scale, the cost of one full
tokenization of the context, which is what a sizing loop that re-tokenizes per try (RULER's binary
search) pays on every iteration.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.build import run_build
from pipeline.core.tokenizer import Tokenizer, load_tokenizer
from pipeline.synth.chat import ChatTemplate, load_template
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.pool import RowPool, pool_from_shards
from pipeline.synth.procedural.sample import build_sample
from schemas.config import load_config, with_overrides
from schemas.manifest import Manifest
from schemas.procedural import (
    AdversarialTask,
    AggregationTask,
    FrequentWordsTask,
    HashChainTask,
    ICLTask,
    MultiNeedleTask,
    QATask,
    VariableTrackingTask,
)

DATA = Path(__file__).resolve().parent.parent / "data"

LENGTHS = (65_536, 262_144, 1_048_576)
TASKS: tuple[Any, ...] = (
    HashChainTask(chains=8, hops=6, queries=2),
    MultiNeedleTask(num_keys=8, values_per_key=2, queries=2, style="mixed"),
    VariableTrackingTask(chains=2, hops=6, distractors=6),
    AggregationTask(top_k=10, frequent_count=20, rare_items=60, rare_count=3),
)
# issue 16: dense contexts (HashHop, RULER's noise / needle-only / entries-only / Zipf-word contexts)
NEW_TASKS: tuple[Any, ...] = (
    HashChainTask(chains=8, hops=4, queries=8, haystack="hashes"),
    HashChainTask(chains=8, hops=4, queries=8, haystack="hashes", prose_share=0.3),
    MultiNeedleTask(num_keys=1, style="classic", haystack="noise"),
    MultiNeedleTask(num_keys=1, style="classic", haystack="needles", key_kind="uuid", value_kind="uuid"),
    VariableTrackingTask(chains=1, hops=4, distractors=0, haystack="noise"),
    AggregationTask(top_k=10, frequent_count=30, rare_items=0, rare_count=3, haystack="entries"),
    FrequentWordsTask(),
)


def evidence_tasks(labelled: Path) -> tuple[Any, ...]:
    """Issue 16.2-16.4: adversarial evidence, RULER's QA over the bundled cloze sets, many-shot ICL."""
    return (
        AdversarialTask(kind="near_miss", distractors=8),
        AdversarialTask(kind="update_latest", distractors=4),
        AdversarialTask(kind="prefix_chain", hops=6, distractors=8),
        QATask(path=str(DATA / "qa" / "wiki_cloze_qa1.jsonl.gz")),
        QATask(path=str(DATA / "qa" / "wiki_cloze_qa2.jsonl.gz"), answers="all"),
        ICLTask(path=str(labelled), label_field="work"),  # shots: min(length // 100, 9000)
    )


def labelled_passages() -> Path:
    """Book passages labelled with their work (the bundled books), 25 words each (~9,800), as JSONL."""
    import io
    import json

    import zstandard

    out = Path(tempfile.mkdtemp(prefix="bench-icl-")) / "works.jsonl"
    with open(DATA / "sample" / "books" / "books.jsonl.zst", "rb") as fb, open(out, "w") as w:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fb), encoding="utf-8"):
            o = json.loads(line)
            words = o["text"].split()
            for a in range(0, len(words) - 25, 25):
                w.write(json.dumps({"text": " ".join(words[a : a + 25]), "work": o["title"]}) + "\n")
    return out


def label(p: object) -> str:
    knobs = p.params()  # type: ignore[attr-defined]
    keys = ("haystack", "prose_share", "key_kind", "kind", "answers", "shots")
    extra = ",".join(f"{k}={knobs[k]}" for k in keys if k in knobs)
    if knobs["task"] == "icl":  # shots are set per length in main()
        extra = extra.replace(f"shots={knobs['shots']}", "shots=min(L/100,9000)")
    return f"{knobs['task']}[{extra}]"


def rows_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    out = Path(tempfile.mkdtemp(prefix="bench-proc-")) / "out"
    cfg = with_overrides(
        load_config(Path(__file__).resolve().parent.parent / "data" / "sample.yaml"), "output", dir=str(out)
    )
    t0 = time.perf_counter()
    run_build(cfg)
    print(f"built the sample rows in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", help="output folder of a finished build (its pretraining rows are the haystack)"
    )
    ap.add_argument("--samples", type=int, default=2, help="samples per task and length")
    ap.add_argument("--new-only", action="store_true", help="only the issue-16 dense tasks")
    ap.add_argument(
        "--evidence-only",
        action="store_true",
        help="only adversarial evidence, QA and many-shot ICL (16.2-4)",
    )
    args = ap.parse_args()
    out = rows_dir(args.rows)
    m = Manifest.model_validate_json((out / "manifest.json").read_text())
    pool = pool_from_shards(out, [(e.path, e.rows) for t in m.targets for e in t.shards])
    tok = load_tokenizer(m.tokenizer.name)
    tpl = load_template("llama3", tok)
    pool_tokens = sum(e.content_tokens for t in m.targets for e in t.shards)
    print(f"pool: {pool.n_rows} packed rows, {pool_tokens:,} document tokens ({m.tokenizer.name})")
    load_template("llama3", tok).render([{"role": "user", "content": "warm up"}])
    from pipeline.synth.chat import boundary_tables

    boundary_tables(tok)  # one-off per process (~0.2 s), not per sample

    if not args.new_only and not args.evidence_only:
        classic(args, pool, tok, tpl)
    tasks = evidence_tasks(labelled_passages()) if args.evidence_only else NEW_TASKS
    print(f"\nissue 16 tasks, seconds per sample:\n{'task':<58} " + " ".join(f"{L:>10,}" for L in LENGTHS))
    for ti, params in enumerate(tasks):
        gen = GENERATORS[params.task]
        cells = []
        for L in LENGTHS:
            times = []
            for i in range(args.samples):
                seed = 5000 + 100 * ti + i
                t0 = time.perf_counter()
                task = params
                if isinstance(params, ICLTask):  # examples fill most of the context at every length
                    task = params.model_copy(update={"shots": min(L // 100, 9000)})
                draft = gen.draft(task, np.random.default_rng(seed), i, (0.0, 0.8))
                want = int(draft.filler.prose * L * 1.1) + 1024 if draft.filler else L + 1024
                hay, _, _ = pool.haystack(
                    tok, int(np.random.default_rng([seed, 1]).integers(pool.n_rows)), want
                )
                built = build_sample(
                    draft, hay, tpl, L, "full_chat", "Answer from the document.", f"n{seed}", seed, {}
                )
                times.append(time.perf_counter() - t0)
                assert len(built.record["input_ids"]) == L
            cells.append(statistics.mean(times))
        print(f"{label(params):<58} " + " ".join(f"{c:>10.3f}" for c in cells))


def classic(args: argparse.Namespace, pool: RowPool, tok: Tokenizer, tpl: ChatTemplate) -> None:
    print(
        f"\n{'length':>9} {'samples':>7} {'s/sample':>9} {'haystack':>9} {'assemble':>9} "
        f"{'(verify)':>9} {'1 full tok':>10} {'tok/s':>12}"
    )
    for L in LENGTHS:
        totals, hays, builds, verifies, fulls = [], [], [], [], []
        for ti, params in enumerate(TASKS):
            gen = GENERATORS[params.task]
            for i in range(args.samples):
                seed = 1000 * ti + i
                t0 = time.perf_counter()
                draft = gen.draft(params, np.random.default_rng(seed), i, (0.0, 1.0))
                start = int(np.random.default_rng([seed, 1]).integers(pool.n_rows))
                hay, _, _ = pool.haystack(tok, start, L + 1024)
                t1 = time.perf_counter()
                built = build_sample(
                    draft, hay, tpl, L, "full_chat", "Answer from the document.", f"b{seed}", seed, {}
                )
                t2 = time.perf_counter()
                assert len(built.record["input_ids"]) == L
                totals.append(t2 - t0)
                hays.append(t1 - t0)
                builds.append(t2 - t1)
                # the verification inside build_sample is one full render + tokenization: time it alone
                t3 = time.perf_counter()
                tpl.render(built.chat.messages)
                verifies.append(time.perf_counter() - t3)
                ctx = built.chat.messages[built.chat.context_message]["content"]
                t4 = time.perf_counter()
                tok.encode(ctx)
                fulls.append(time.perf_counter() - t4)
        mean = statistics.mean
        print(
            f"{L:>9,} {len(totals):>7} {mean(totals):>9.3f} {mean(hays):>9.3f} {mean(builds):>9.3f} "
            f"{mean(verifies):>9.3f} {mean(fulls):>10.3f} {L / mean(totals):>12,.0f}"
        )
    print(
        "\nhaystack = read rows + decode + token ids (reused from the rows, only segment edges re-tokenized); assemble = place needles at safe boundaries, size the "
        "tail, lineage, and one verifying full tokenization ((verify) column, timed again on its own). "
        "A sizing loop that re-tokenizes the context per try pays '1 full tok' each iteration "
        "(a binary search over 1M tokens: about 20 of them)."
    )


if __name__ == "__main__":
    main()
