"""LLM rewriter against a local OpenAI-compatible server over real HTTP (the real `openai` client).

The packed rows are built once per module; each test copies them into its own output folder and runs
the rewriter stage there, so tests stay independent and take a few seconds each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.build import output_units, preflight, run_build
from pipeline.core.tokenizer import load_tokenizer
from pipeline.core.workdir import WorkDir
from pipeline.stages.plan import select as select_and_layout
from pipeline.stages.prepare import prepare_shard
from pipeline.stages.rewriter import RewriterOutput, run_rewriter
from pipeline.stages.select import SelectResult
from pipeline.stages.write import write_shard
from pipeline.synth.chat import load_template as load_chat_template
from pipeline.synth.rewriter.cache import ResponseCache
from pipeline.synth.rewriter.client import ChatRequest, RequestBudget, RewriterClient, retry_after_seconds
from pipeline.synth.rewriter.evidence import NormalizedText
from pipeline.synth.rewriter.parsing import ParseFailure, parse_json_answer
from pipeline.synth.rewriter.secrets import Redactor, endpoint_host
from pipeline.synth.rewriter.templates import (
    TemplateError,
    available_templates,
    load_template,
    parse_template,
)
from schemas.config import BuildConfig, ConfigError
from tests.conftest import make_config
from tests.openai_server import FakeOpenAIServer, FaultRule
from tests.secretscan import assert_no_secrets

KEY = "sk-longloom-test-7f3a9c1e5d"
SAMPLE_LENGTH = 2048


def rewriter_section(base_url: str, **kw: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "base_url": base_url,
        "model": "fake-model",
        "sample_length": SAMPLE_LENGTH,
        "reserve_tokens": 256,
        "chunk_tokens": 160,
        "timeout_seconds": 1.0,
        "backoff_seconds": 0.01,
        "max_attempts": 4,
        "concurrency": 8,
        "contexts_per_task": 4,
        "progress": False,
        "prices": {"fake-model": {"prompt_per_million": 2.0, "completion_per_million": 8.0}},
        "strategies": [{"kind": "chunk_qa", "samples": 8}],
    }
    section.update(kw)
    return section


def pack_sample(out: Path) -> tuple[Path, SelectResult]:
    """The bundled sample packed (no rewriter) into `out`: the folder and its select result."""
    from pipeline.build import lineage_steps

    cfg = make_config(out)
    work = WorkDir(cfg)
    prepared = [prepare_shard(cfg, s, work) for s in preflight(cfg)]
    selected = select_and_layout(cfg, work, prepared)
    steps = lineage_steps(prepared, selected)
    for ti, k in output_units(selected):
        write_shard(cfg, work, selected, prepared, ti, k, steps)
    return out, selected


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SelectResult]:
    return pack_sample(tmp_path_factory.mktemp("packed") / "out")


@pytest.fixture
def conversations(tmp_path: Path) -> Path:
    """A small ShareGPT-style JSON array, cut short at the end like real dumps, plus one bad record."""
    convs = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"How do I reverse list number {i} in Python?"},
                {"from": "gpt", "value": f"Call  reversed(x)  or x[::-1] for list {i}."},
                {"from": "human", "value": f"And sort list {i}?"},
                {"from": "gpt", "value": f"Use sorted(x) for list {i}."},
            ],
        }
        for i in range(6)
    ]
    convs.insert(2, {"id": "bad", "conversations": "not a list"})
    text = json.dumps(convs)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.rindex("{")])  # truncated mid-record
    return path


def setup_run(packed: tuple[Path, SelectResult], tmp_path: Path, section: dict[str, Any]) -> BuildConfig:
    src, _ = packed
    out = tmp_path / "out"
    shutil.copytree(src / "data", out / "data")
    return make_config(out, rewriter=section)


def run(cfg: BuildConfig, selected: SelectResult) -> RewriterOutput:
    return run_rewriter(cfg, WorkDir(cfg), selected)


def read_samples(cfg: BuildConfig, config: str | None = None) -> list[dict[str, Any]]:
    """The samples of one config, or of both rewriter configs (long rows, then plain rephrases)."""
    names = [config] if config else ["rewriter", "rewriter_rephrase"]
    files = [f for n in names for f in sorted((Path(cfg.output.dir) / "data" / n).glob("*.parquet"))]
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def read_audit(cfg: BuildConfig) -> list[dict[str, Any]]:
    files = sorted((Path(cfg.output.dir) / "audit" / "rewriter_rejected").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def assert_reconciles(stats: dict[str, Any], requested: int) -> None:
    assert stats["requested"] == requested
    assert stats["requested"] == stats["accepted"] + sum(stats["rejected"].values()) + sum(
        stats["failed"].values()
    )
    assert stats["reconciles"] is True


def assert_no_key(out: Path, *texts: str, key: str = KEY) -> None:
    """No trace of the key in the output folder (read by kind: see tests.secretscan) or the texts."""
    assert_no_secrets([out], [key], {f"text {i}": t for i, t in enumerate(texts)})


# --- small pieces ---------------------------------------------------------------------------------------


def test_tolerant_parsing() -> None:
    assert parse_json_answer('{"a": 1}') == {"a": 1}
    assert parse_json_answer('Sure!\n```json\n{"a": "x",}\n```\nHope it helps') == {"a": "x"}
    assert parse_json_answer('Here: {"q": "what {is} it", "n": [1, 2,]} trailing') == {
        "q": "what {is} it",
        "n": [1, 2],
    }
    with pytest.raises(ParseFailure) as err:
        parse_json_answer('{"question": "abc", "answer": "de', finish_reason="length")
    assert err.value.reason == "truncated_output"
    with pytest.raises(ParseFailure) as err:  # an inner object of a cut answer is not the answer
        parse_json_answer(
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assi', finish_reason="length"
        )
    assert err.value.reason == "truncated_output"
    with pytest.raises(ParseFailure) as err:
        parse_json_answer("no json at all")
    assert err.value.reason == "unparseable"
    with pytest.raises(ParseFailure) as err:
        parse_json_answer("   ")
    assert err.value.reason == "empty_response"


def test_quotes_found_up_to_whitespace_case_and_typography() -> None:
    text = "Intro.\n\nThe  “Old Mill”\tburned down —\nin 1887.  Then nothing."
    norm = NormalizedText.of(text)
    spans = norm.find_all('the "old mill" burned down - in 1887')
    assert len(spans) == 1
    a, b = spans[0]
    assert text[a:b] == "The  “Old Mill”\tburned down —\nin 1887"
    assert norm.find_all("burned up") == []
    assert len(NormalizedText.of("ab ab ab").find_all("ab")) == 3


def test_templates_are_versioned_files() -> None:
    names = available_templates()
    assert {"chunk_qa", "multi_hop", "session_state", "rephrase", "rephrase_grounded"} <= set(names)
    for n in names:
        t = load_template(n)
        assert t.version and t.kind and t.response_schema
        msgs = t.render(passage="P", passages=["A", "B"], turns=3, conversation="[]")
        assert msgs[-1]["role"] == "user" and msgs[-1]["content"]
    rf = load_template("rephrase").response_format("json_schema", {"messages": 4})
    assert rf is not None and rf["json_schema"]["schema"]["properties"]["messages"]["maxItems"] == 4
    assert "maxItems" not in load_template("rephrase").response_schema["properties"]["messages"]  # type: ignore[index]
    assert load_template("rephrase").response_format("json_object") == {"type": "json_object"}
    with pytest.raises(TemplateError, match=r"x\.txt: front matter needs `version`"):
        parse_template("---\nname: x\nkind: chunk_qa\n---\n=== user ===\nhi\n", "x.txt")


def test_cache_key_covers_what_determines_the_answer() -> None:
    msgs = [{"role": "user", "content": "hello"}]
    base = ChatRequest.build("chunk_qa", "1", msgs, {"temperature": 0.5, "seed": 1}, {"type": "json_object"})
    k = base.cache_key("m")
    assert k == ChatRequest.build(
        "chunk_qa", "1", msgs, {"seed": 1, "temperature": 0.5}, {"type": "json_object"}
    ).cache_key("m")
    assert k != base.cache_key("other-model")
    assert k != ChatRequest.build(
        "chunk_qa", "2", msgs, {"temperature": 0.5, "seed": 1}, {"type": "json_object"}
    ).cache_key("m")
    assert k != ChatRequest.build(
        "chunk_qa", "1", msgs, {"temperature": 0.5, "seed": 2}, {"type": "json_object"}
    ).cache_key("m")
    assert k != ChatRequest.build(
        "chunk_qa",
        "1",
        [{"role": "user", "content": "hello!"}],
        {"temperature": 0.5, "seed": 1},
        {"type": "json_object"},
    ).cache_key("m")


def test_retry_after_and_endpoint_host() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({}) is None
    assert endpoint_host("https://user:pw@api.example.com:8443/v1?key=abc") == "api.example.com:8443"
    assert Redactor(["sk-abcdef"])("error sk-abcdef here") == "error *** here"


def test_bad_rewriter_config_fails_before_work(tmp_path: Path) -> None:
    section = rewriter_section(
        "http://127.0.0.1:9/v1",
        chat_template="nope",
        context_target=1234,
        strategies=[
            {"kind": "chunk_qa", "samples": 1, "template": "session_state"},
            {"kind": "multi_hop", "samples": 1, "template": "missing"},
            {"kind": "rephrase", "samples": 1, "inputs": ["no/such/*.jsonl"]},
        ],
    )
    cfg = make_config(tmp_path / "out", rewriter=section)
    with pytest.raises(ConfigError) as err:
        run_build(cfg)
    msg = str(err.value)
    for part in (
        "rewriter.chat_template: 'nope'",
        "rewriter.context_target: 1234",
        "strategies.0.template: 'session_state' is for 'session_state', not 'chunk_qa'",
        "strategies.1.template: no prompt template 'missing'",
        "strategies.2.inputs: rewriter rephrase input 'no/such/*.jsonl': no file matches",
    ):
        assert part in msg
    assert not (tmp_path / "out" / "data").exists()  # nothing ran


def test_config_errors_never_echo_the_key() -> None:
    with pytest.raises(ConfigError, match="no strategy requests samples"):
        make_config(Path("/tmp/x"), rewriter={"enabled": True, "api_key": KEY})
    cfg = make_config(Path("/tmp/x"), rewriter={"enabled": False, "api_key": KEY})
    assert KEY not in json.dumps(cfg.model_dump(mode="json"))
    with pytest.raises(ConfigError, match="needs `inputs`"):
        make_config(Path("/tmp/x"), rewriter={"strategies": [{"kind": "rephrase", "samples": 2}]})


# --- the client against real HTTP -----------------------------------------------------------------------


def _requests(n: int) -> list[ChatRequest]:
    t = load_template("chunk_qa")
    return [
        ChatRequest.build(
            "chunk_qa",
            t.version,
            t.render(
                passage=f"Passage {i}: The harbour master of Vell counted {i * 7 + 3} ships that spring."
            ),
            {"temperature": 0.0},
            t.response_format("json_object"),
        )
        for i in range(n)
    ]


def _complete(
    srv: FakeOpenAIServer, reqs: list[ChatRequest], tmp: Path | None, budget: int | None = None, **kw: Any
) -> tuple[list[Any], RewriterClient]:
    from schemas.synthesis import RewriterConfig

    settings: dict[str, Any] = {"timeout_seconds": 1.0, "backoff_seconds": 0.01, "max_attempts": 3, **kw}
    cfg = RewriterConfig(base_url=srv.base_url, model="fake-model", **settings)
    client = RewriterClient(cfg, KEY, ResponseCache(tmp), RequestBudget(budget), Redactor([KEY]))

    async def go() -> list[Any]:
        async with client:
            return list(await asyncio.gather(*(client.complete(r) for r in reqs)))

    return asyncio.run(go()), client


def test_client_retries_faults_then_records_them(tmp_path: Path) -> None:
    reqs = _requests(6)
    faults = [
        FaultRule("Passage 0:", ["429:1", "ok"]),
        FaultRule("Passage 1:", ["500", "503", "ok"]),
        FaultRule("Passage 2:", ["hang:9", "ok"]),
        FaultRule("Passage 3:", ["500"] * 5),
        FaultRule("Passage 4:", ["400"]),
    ]
    import openai  # noqa: F401  # the client loads the SDK on first use: not part of what is timed

    with FakeOpenAIServer(faults=faults, api_key=KEY) as srv:
        prices = {"fake-model": {"prompt_per_million": 2.0, "completion_per_million": 8.0}}
        # a 3 s timeout: a healthy answer on a busy machine must not time out, the 9 s hang must
        res, client = _complete(srv, reqs, tmp_path / "cache", prices=prices, timeout_seconds=3.0)
        calls = list(srv.calls)
    ok = [r.ok for r in res]
    assert ok == [True, True, True, False, False, True]
    assert [r.attempts for r in res] == [2, 3, 2, 3, 1, 1]
    assert res[3].error_reason == "http_500" and "gave up after 3 attempts" in (res[3].error_detail or "")
    assert res[4].error_reason == "http_400"  # a client error is not retried
    # Retry-After: 1 was honoured (backoff alone would have waited ~10 ms)
    p0 = [c.at for c in calls if "Passage 0:" in json.dumps(c.body)]
    assert p0[1] - p0[0] >= 0.95
    # the hang was cut by the timeout and retried, not waited out: its retry came before the hang ended
    p2 = [c.at for c in calls if "Passage 2:" in json.dumps(c.body)]
    assert len(p2) == 2 and p2[1] - p2[0] < 9
    u = client.usage["chunk_qa"]
    assert u.retry_reasons == {"http_429": 1, "http_500": 3, "http_503": 1, "timeout": 1}
    assert u.failures == {"http_500": 1, "http_400": 1}
    assert u.requests == len(calls) == 12
    assert u.responses == 4 and u.prompt_tokens > 0
    assert u.cost == pytest.approx((u.prompt_tokens * 2 + u.completion_tokens * 8) / 1e6)
    assert all(c.authorization == f"Bearer {KEY}" for c in calls)


def test_budget_caps_requests_and_cache_serves_reruns(tmp_path: Path) -> None:
    reqs = _requests(5)
    with FakeOpenAIServer(faults=[FaultRule("Passage 0:", ["500", "ok"])]) as srv:
        res, _ = _complete(srv, reqs, tmp_path / "cache", budget=4, concurrency=1)
        assert len(srv.calls) == 4
        assert Counter(r.error_reason for r in res if not r.ok) == {"budget_exhausted": 2}
        # rerun without a budget: only the two unanswered prompts go out
        res2, client2 = _complete(srv, reqs, tmp_path / "cache")
        assert all(r.ok for r in res2) and len(srv.calls) == 6
        assert sum(r.cached for r in res2) == 3 and client2.usage["chunk_qa"].cache_hits == 3
        # and a third run is all cache
        res3, _ = _complete(srv, reqs, tmp_path / "cache")
        assert len(srv.calls) == 6 and all(r.cached for r in res3)


def test_json_mode_refused_falls_back_to_tolerant_parsing(tmp_path: Path) -> None:
    with FakeOpenAIServer(refuse_json_mode=True) as srv:
        res, _ = _complete(srv, _requests(3), None, concurrency=1)
        assert all(r.ok and not r.json_mode_used for r in res)
        assert srv.actions()["400"] == 1  # asked with response_format once, then never again
        assert all(parse_json_answer(r.content)["question"] for r in res)


def test_key_in_an_error_message_is_redacted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key="sk-the-right-one") as srv:  # echoes the wrong key it receives
        res, _ = _complete(srv, _requests(2), tmp_path / "cache")
    assert all(r.error_reason == "http_401" for r in res)
    assert all(KEY not in (r.error_detail or "") and "***" in (r.error_detail or "") for r in res)
    assert KEY not in caplog.text


# --- the stage: samples, validation, accounting ---------------------------------------------------------


def test_stage_faults_counts_reconcile_and_key_stays_secret(
    packed: tuple[Path, SelectResult],
    tmp_path: Path,
    conversations: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LONGLOOM_REWRITER_API_KEY", KEY)
    strategies = [
        {"kind": "chunk_qa", "samples": 10},
        {"kind": "multi_hop", "samples": 3, "hops": 2},
        {"kind": "session_state", "samples": 3},
        {"kind": "rephrase", "samples": 6, "inputs": [str(conversations)]},  # 5 usable in the file
        {"kind": "rephrase", "samples": 2, "inputs": [str(conversations)], "grounded": True},
    ]
    faults = [
        FaultRule("<passage>", ["429:0.2", "ok"], claim=2),
        FaultRule("<passage>", ["500", "ok"], claim=2),
        FaultRule("<passage>", ["hang:3", "ok"], claim=1),
        FaultRule("<passage>", ["invalid_json"], claim=2),
        FaultRule("<passage>", ["bad_quote"], claim=2),
        FaultRule("<passage>", ["500"] * 10, claim=1),
    ]
    with FakeOpenAIServer(faults=faults, api_key=KEY) as srv:
        cfg = setup_run(packed, tmp_path, rewriter_section(srv.base_url, strategies=strategies))
        out = run(cfg, packed[1])
    stats = out.stats
    assert_reconciles(stats, 24)
    assert stats["failed"].get("http_500") == 1
    assert stats["failed"].get("no_input") == 1
    assert stats["rejected"].get("unparseable") == 2
    assert stats["rejected"].get("evidence_not_found") == 2
    assert stats["totals"]["retries"] >= 2 + 2 + 1 + 3
    assert stats["totals"]["cost"] > 0
    # the conversations file: 6 conversations and a record that is not one, cut short in the last
    assert stats["skipped_inputs"] == {"not_a_conversation": 1, "malformed_json": 1}

    samples = read_samples(cfg)
    audit = read_audit(cfg)
    assert len(samples) == stats["accepted"]
    assert len(audit) == sum(stats["rejected"].values()) + sum(stats["failed"].values())
    assert {s["sample_id"] for s in samples}.isdisjoint(a["sample_id"] for a in audit)
    bad = [a for a in audit if a["reason"] == "unparseable"]
    assert all(a["raw_response"] and a["raw_response"].startswith("Sure!") for a in bad)
    assert {s["task"] for s in samples} == {"chunk_qa", "multi_hop", "session_state", "rephrase"}
    # issue 17.3: plain rephrases (no long context) have their own config, apart from the long rows
    long_rows, plain = read_samples(cfg, "rewriter"), read_samples(cfg, "rewriter_rephrase")
    assert len(long_rows) + len(plain) == len(samples) and plain
    assert all(s["task"] == "rephrase" and s["context_tokens"] == 0 for s in plain)
    assert all(s["context_tokens"] > 0 and s["length"] == SAMPLE_LENGTH for s in long_rows)
    assert {s["task"] for s in long_rows} == {"chunk_qa", "multi_hop", "session_state", "rephrase"}
    assert set(out.extra_configs) == {"rewriter", "rewriter_rephrase"}
    assert [sum(e.rows for e in out.extra_configs[n]) for n in ("rewriter", "rewriter_rephrase")] == [
        len(long_rows),
        len(plain),
    ]

    tok = load_tokenizer("quicktok:llama3")
    chat = load_chat_template("llama3", tok)
    for s in samples:
        ids = chat.render(s["messages"]).ids
        assert len(ids) == s["length"] and s["input_ids"] == ids.tolist()
        if s["context_tokens"]:
            assert s["length"] == s["target_length"] == SAMPLE_LENGTH
            assert s["haystack"] and s["model"]["endpoint_host"].startswith("127.0.0.1:")
            assert s["haystack_rows"] and all(r.startswith("pretrain_16384-") for r in s["haystack_rows"])
        for e in s["evidence"]:
            text = s["messages"][e["message_index"]]["content"][e["char_start"] : e["char_end"]]
            assert " ".join(text.split()) in " ".join(
                tok.decode(ids[e["token_start"] : e["token_end"]]).split()
            )
        for q in s["questions"]:
            assert q["text"].strip() in tok.decode(ids[q["token_start"] : q["token_end"]])
            if q["evidence"]:
                first = min(s["evidence"][i]["token_start"] for i in q["evidence"])
                assert q["dependency_distance"] == q["token_start"] - first > 0
        params = json.loads(s["params"])
        assert params["response"]["prompt_tokens"] > 0
        for p in params["passages"]:
            assert p["segment"]["doc_id"] and p["segment"]["row_id"].startswith("pretrain_16384-")
    hop = [s for s in samples if s["task"] == "multi_hop"]
    assert all(len([e for e in s["evidence"] if e["label"] == "quote"]) == 2 for s in hop)
    state = [s for s in samples if s["task"] == "session_state"]
    assert all(len(s["messages"]) == 6 and s["questions"][-1]["match"] == "set" for s in state)
    assert all(any(e["label"] == "state_change" for e in s["evidence"]) for s in state)

    captured = capsys.readouterr()
    assert_no_key(Path(cfg.output.dir), caplog.text, captured.out, captured.err)


def test_cached_rerun_makes_no_http_calls(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    faults = [FaultRule("<passage>", ["invalid_json"], claim=1)]  # a bad answer is cached like any other
    with FakeOpenAIServer(faults=faults) as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url,
                strategies=[{"kind": "chunk_qa", "samples": 6}, {"kind": "session_state", "samples": 2}],
            ),
        )
        first = run(cfg, packed[1])
        n_calls = len(srv.calls)
        assert n_calls == 8
        samples1 = read_samples(cfg)
        second = run(cfg, packed[1])
        assert len(srv.calls) == n_calls  # zero HTTP calls
        samples2 = read_samples(cfg)
    assert second.stats["totals"]["requests"] == 0 and second.stats["totals"]["cache_hits"] == 8
    assert first.stats["accepted"] == second.stats["accepted"] == 7
    assert second.stats["rejected"] == {"unparseable": 1}
    assert [s["messages"] for s in samples1] == [s["messages"] for s in samples2]


def test_crash_midway_costs_no_repeated_calls(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    with FakeOpenAIServer() as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url, request_budget=3, concurrency=1, strategies=[{"kind": "chunk_qa", "samples": 8}]
            ),
        )
        first = run(cfg, packed[1])
        assert len(srv.calls) == 3
        assert sum(first.stats["failed"].values()) == first.stats["failed"]["budget_exhausted"] == 5
        assert_reconciles(first.stats, 8)
        again = make_config(
            Path(cfg.output.dir),
            rewriter=rewriter_section(srv.base_url, strategies=[{"kind": "chunk_qa", "samples": 8}]),
        )
        second = run(again, packed[1])
    assert len(srv.calls) == 8  # only the 5 never answered were asked
    assert second.stats["totals"]["cache_hits"] == 3 and second.stats["accepted"] == 8


def _context_start(s: dict[str, Any]) -> float:
    """Sample token where the context begins (evidence depth = (token - start) / context_tokens)."""
    e = s["evidence"][0]
    return float(e["token_start"] - e["depth"] * s["context_tokens"])


def test_passages_end_before_the_rejected_tail(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    """Passages asked for at 0.05 and 0.93 of the context: the second is moved to end before the last
    20%, which the tail check would reject, so no request is spent on a sample that cannot be kept."""
    with FakeOpenAIServer() as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url,
                chunk_depths=[0.05, 0.93],
                reject_tail_fraction=0.2,
                chunk_tokens=96,
                strategies=[{"kind": "chunk_qa", "samples": 8}],
            ),
        )
        out = run(cfg, packed[1])
    assert_reconciles(out.stats, 8)
    assert out.stats["rejected"] == {} and out.stats["accepted"] == 8
    kept = read_samples(cfg)
    for s in kept:
        start = _context_start(s)
        for p in json.loads(s["params"])["passages"]:
            assert (p["token_end"] - start) / s["context_tokens"] < 0.8, p
    assert max(e["depth"] for s in kept for e in s["evidence"]) > 0.6  # the late ones are still late


def test_evidence_in_the_tail_is_rejected(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    """A model that quotes the context's tail instead of the passage: rejected as locally answerable."""
    section = rewriter_section("", strategies=[{"kind": "chunk_qa", "samples": 1}], reject_tail_fraction=0.2)
    with FakeOpenAIServer() as srv:
        cfg = setup_run(packed, tmp_path, {**section, "base_url": srv.base_url})
        run(cfg, packed[1])
        (s,) = read_samples(cfg)
        context = s["messages"][0]["content"]
        tail = context[int(len(context) * 0.95) :]
        quote = max((x.strip() for x in tail.split("\n")), key=len)[:120]
        assert len(quote) >= 20 and context.count(quote) == 1
        shutil.rmtree(Path(cfg.output.dir) / ".longloom" / "rewriter-cache")
        srv.faults.append(FaultRule("<passage>", [f"quote:{quote}"]))
        out = run(cfg, packed[1])
    assert out.stats["rejected"] == {"evidence_in_tail": 1}
    (a,) = read_audit(cfg)
    assert "last 20%" in a["detail"] and quote in a["raw_response"]


def test_repeated_questions_are_dropped(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    from tests.openai_server import default_answer

    def same_question(prompt: str) -> dict[str, Any]:
        ans = default_answer(prompt)
        ans["question"] = "What does the passage say about the king?"
        return ans

    with FakeOpenAIServer(responder=same_question) as srv:
        cfg = setup_run(
            packed, tmp_path, rewriter_section(srv.base_url, strategies=[{"kind": "chunk_qa", "samples": 6}])
        )
        out = run(cfg, packed[1])
    assert out.stats["accepted"] == 1
    assert out.stats["rejected"] == {"duplicate_question": 5}
    assert_reconciles(out.stats, 6)
    assert all("same question as chunk_qa-0-000000" in a["detail"] for a in read_audit(cfg))


def test_run_build_reports_rewriter_in_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGLOOM_REWRITER_API_KEY", KEY)
    with FakeOpenAIServer(api_key=KEY, faults=[FaultRule("<passage>", ["bad_quote"], claim=1)]) as srv:
        cfg = make_config(
            tmp_path / "out",
            rewriter=rewriter_section(srv.base_url, strategies=[{"kind": "chunk_qa", "samples": 4}]),
        )
        m = run_build(cfg)
        first_manifest = (tmp_path / "out" / "manifest.json").read_bytes()
        first_report = json.loads((tmp_path / "out" / "report.json").read_text())
        run_build(cfg)  # every answer from the cache: other spending, same manifest
        rerun_report = json.loads((tmp_path / "out" / "report.json").read_text())
    st = m.extra["rewriter"]
    assert_reconciles(st, 4)
    assert st["accepted"] == 3 and st["rejected"] == {"evidence_not_found": 1}
    # what a run spent is in its report, never in the manifest, so a cached rerun's manifest is identical
    assert "usage" not in st and "totals" not in st
    assert (tmp_path / "out" / "manifest.json").read_bytes() == first_manifest
    spent = first_report["rewriter"]
    assert spent["usage"]["chunk_qa"]["prompt_tokens"] > 0 and spent["totals"]["requests"] == 4
    assert rerun_report["rewriter"]["totals"]["requests"] == 0
    assert rerun_report["rewriter"]["totals"]["cache_hits"] == 4
    assert [e.rows for e in m.extra_configs["rewriter"]] == [3]
    assert [e.rows for e in m.audit["rewriter_rejected"]] == [1]
    assert m.stages["rewriter"].items_out == 3
    assert m.ok
    assert {c.name for c in m.checks} >= {
        "rewriter: requested = accepted + rejected + failed",
        "rewriter: files match counts",
    }
    assert m.config["rewriter"]["api_key"] is None
    from datasets import load_dataset

    ds = load_dataset(str(tmp_path / "out"), "rewriter", split="train")
    assert len(ds) == 3 and ds[0]["model"]["model"] == "fake-model"
    assert_no_key(tmp_path / "out")


def test_distances_are_spread_over_the_context(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    with FakeOpenAIServer() as srv:
        cfg = setup_run(
            packed, tmp_path, rewriter_section(srv.base_url, strategies=[{"kind": "chunk_qa", "samples": 10}])
        )
        out = run(cfg, packed[1])
    depths = np.array([e["depth"] for s in read_samples(cfg) for e in s["evidence"]])
    assert out.stats["accepted"] == 10
    assert depths.min() < 0.2 and depths.max() > 0.6 and (depths < 0.9).all()
    assert sum(out.stats["evidence_depth_histogram"]) == 10


@pytest.mark.slow
def test_prefect_flow_runs_the_rewriter_stage(
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flows.build import run as run_flow

    monkeypatch.setenv("LONGLOOM_REWRITER_API_KEY", KEY)
    faults = [
        FaultRule("<passage>", ["429:0.1", "ok"], claim=2),
        FaultRule("<passage>", ["500"] * 9, claim=1),
    ]
    with FakeOpenAIServer(api_key=KEY, faults=faults) as srv:
        cfg = make_config(
            tmp_path / "out",
            rewriter=rewriter_section(
                srv.base_url,
                contexts_per_task=3,
                strategies=[{"kind": "chunk_qa", "samples": 6}, {"kind": "multi_hop", "samples": 3}],
            ),
        )
        result = run_flow(cfg)
    assert result["checks_ok"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    st = manifest["extra"]["rewriter"]
    assert_reconciles(st, 9)
    assert st["failed"] == {"http_500": 1} and st["batches"] == 3
    assert "totals" not in st  # what the run spent is in the run report, not the manifest
    spent = json.loads((tmp_path / "out" / "report.json").read_text())["rewriter"]
    assert spent["totals"]["retries"] >= 2 + 3
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text  # Prefect logs to the console or to handlers
    assert "rewriter: 8/9 accepted" in logs  # the flow run's summary names the rewriter's outcome
    assert_no_key(tmp_path / "out", logs)


# --- issue 12: transient answers, deadlines, reproducible rows, rephrase checks, one concurrency limit ---


def test_empty_choices_are_retried_and_never_cached(tmp_path: Path) -> None:
    faults = [
        FaultRule("Passage 0:", ["empty_choices", "ok"]),
        FaultRule("Passage 1:", ["empty_choices"] * 5),
    ]
    with FakeOpenAIServer(faults=faults) as srv:
        res, client = _complete(srv, _requests(2), tmp_path / "cache")
    assert res[0].ok and res[0].attempts == 2 and parse_json_answer(res[0].content)["question"]
    assert not res[1].ok and res[1].error_reason == "empty_choices" and res[1].attempts == 3
    assert client.usage["chunk_qa"].retry_reasons == {"empty_choices": 3}
    assert client.usage["chunk_qa"].failures == {"empty_choices": 1}
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # only the real answer


def test_timeout_is_a_deadline_for_the_whole_response(tmp_path: Path) -> None:
    """A body dripped over 3 s, each piece well within the 1 s timeout: cut at 1 s and asked again."""
    with FakeOpenAIServer(faults=[FaultRule("Passage 0:", ["drip:3", "ok"])]) as srv:
        res, client = _complete(srv, _requests(1), None)
        assert srv.actions() == {"drip": 1, "ok": 1}
    assert res[0].ok and res[0].attempts == 2
    assert client.usage["chunk_qa"].retry_reasons == {"timeout": 1}


def _written(cfg: BuildConfig) -> dict[str, bytes]:
    out = Path(cfg.output.dir)
    files = [*(out / "data" / "rewriter").glob("*.parquet"), *(out / "audit" / "rewriter_rejected").glob("*")]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def test_reruns_and_resumes_write_identical_files(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    faults = [
        FaultRule("<passage>", ["429:0", "ok"], claim=2),  # answers that took two attempts
        FaultRule("<passage>", ["invalid_json"], claim=1),  # an answer that is rejected (audit row)
    ]
    with FakeOpenAIServer(faults=faults) as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url,
                strategies=[{"kind": "chunk_qa", "samples": 6}, {"kind": "session_state", "samples": 2}],
            ),
        )
        first = run(cfg, packed[1])
        files = _written(cfg)
        run(cfg, packed[1])  # every answer from the cache
        assert _written(cfg) == files
        cache = sorted((Path(cfg.output.dir) / ".longloom" / "rewriter-cache").rglob("*.json"))
        for p in cache[::2]:  # a resume: half the answers were never stored
            p.unlink()
        n = len(srv.calls)
        run(cfg, packed[1])
        assert len(srv.calls) == n + len(cache[::2])
    assert _written(cfg) == files
    assert first.stats["accepted"] == 7 and first.stats["rejected"] == {"unparseable": 1}
    params = [json.loads(s["params"]) for s in read_samples(cfg)]
    assert all(set(p["response"]) >= {"finish_reason", "prompt_tokens"} for p in params)
    assert not any({"cached", "attempts"} & set(p["response"]) for p in params)


def test_placeholder_and_out_of_proportion_rephrases_are_rejected(
    packed: tuple[Path, SelectResult], tmp_path: Path, conversations: Path
) -> None:
    from tests.openai_server import default_answer

    def lazy_model(prompt: str) -> dict[str, Any]:
        ans = default_answer(prompt)
        if "list number 0" in prompt:  # the template's example, copied
            ans["messages"] = [{"role": m["role"], "content": "..."} for m in ans["messages"]]
        if "list number 1" in prompt:  # one answer blown up to thirty times its length
            ans["messages"][3]["content"] = " ".join([ans["messages"][3]["content"]] * 30)
        if "list number 3" in prompt:  # short turns may change freely
            ans["messages"][3]["content"] = "Use sorted()."
        return ans

    with FakeOpenAIServer(responder=lazy_model) as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url, strategies=[{"kind": "rephrase", "samples": 5, "inputs": [str(conversations)]}]
            ),
        )
        out = run(cfg, packed[1])
    assert_reconciles(out.stats, 5)
    assert out.stats["rejected"] == {"placeholder_turn": 1, "length_ratio": 1}
    assert out.stats["accepted"] == 3
    details = {a["reason"]: a["detail"] for a in read_audit(cfg)}
    assert "message 0 is a placeholder" in details["placeholder_turn"]
    assert "message 3 has" in details["length_ratio"]


def test_concurrency_is_one_limit_across_tasks(packed: tuple[Path, SelectResult], tmp_path: Path) -> None:
    """Two batches run at once in threads (as the thread runner runs tasks): the endpoint still sees at
    most `concurrency` requests in flight, not concurrency x workers."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.stages.rewriter import run_batch
    from pipeline.synth.rewriter.plan import make_plan

    with FakeOpenAIServer(latency=1.0) as srv:
        cfg = setup_run(
            packed,
            tmp_path,
            rewriter_section(
                srv.base_url,
                concurrency=2,
                contexts_per_task=4,
                timeout_seconds=30.0,
                strategies=[{"kind": "chunk_qa", "samples": 8}],
            ),
        )
        plan = make_plan(cfg, packed[1])
        assert len(plan.batches) == 2
        work = WorkDir(cfg)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda b: run_batch(cfg, work, b, plan.sample_length), plan.batches))
        peak = srv.peak_in_flight
    assert sum(r.requests_sent for r in results) == 8
    assert peak == 2
