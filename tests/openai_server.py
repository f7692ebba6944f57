"""A local OpenAI-compatible chat server for tests and benchmarks: deterministic answers, scripted faults.

It answers `POST /v1/chat/completions` over real HTTP on 127.0.0.1, so the real `openai` client is
exercised end to end. Answers are computed from the prompt (the passages and conversations the
rewriter templates embed), so the same prompt always gets the same answer, whatever the concurrency.

Faults are scripted per prompt: a `FaultRule` matches prompts (a substring or a predicate) and lists
what successive attempts of one prompt get: "429:<retry-after seconds>", "500", "503", "401",
"hang:<seconds>", "invalid_json", "bad_quote", "quote:<text>" (use this evidence quote),
"unsupported_answer" (a good question and evidence, and an answer stating facts found in neither),
or "ok";
"empty_choices" (a 200 whose `choices` is empty), "drip:<seconds>" (a good answer whose body is sent
in small pieces spread over that many seconds: every read is quick, the whole is slow), and
"echo_key" (a good answer that also quotes the Authorization header and the query string it got).

`peak_in_flight` is the most requests the server was handling at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PASSAGE = re.compile(r"<passage(?: id=\"(\d+)\")?>\n(.*?)\n</passage>", re.DOTALL)


@dataclass
class FaultRule:
    """Script for prompts that contain `match` (a substring or a predicate; None: any prompt).

    With `claim=k`, the rule takes only the first k distinct prompts it sees (in arrival order) that no
    other rule has taken; the number of faulted prompts is then exact whatever the concurrency.
    """

    match: str | Callable[[str], bool] | None
    actions: list[str]
    claim: int | None = None
    claimed: set[str] = field(default_factory=set)

    def applies(self, prompt: str) -> bool:
        if self.match is None:
            return True
        return self.match in prompt if isinstance(self.match, str) else bool(self.match(prompt))


@dataclass
class Call:
    at: float
    prompt_hash: str
    action: str
    authorization: str
    body: dict[str, Any]
    path: str = ""  # request path with its query string


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;:])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.strip()) >= 24]


def _quote(passage: str, salt: str = "") -> str:
    """A deterministic verbatim piece of the passage: one of its sentences, at most 160 characters."""
    sents = _sentences(passage) or [passage.strip()]
    i = int(hashlib.sha256((passage + salt).encode()).hexdigest(), 16) % len(sents)
    s = sents[i]
    return s[:160].rsplit(" ", 1)[0] if len(s) > 160 else s


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_answer(prompt: str, bad_quote: bool = False, quote: str | None = None) -> dict[str, Any]:
    """The JSON object a well-behaved model would return for one of the rewriter's prompts."""
    passages = [(m.group(1), m.group(2)) for m in _PASSAGE.finditer(prompt)]
    conv = None
    at = prompt.find('[{"role"')
    if at >= 0:
        conv, _ = json.JSONDecoder().raw_decode(prompt[at:])
    fake = f"The moon base Tycho-{_tag(prompt)} was painted violet in 2291."

    def q(text: str, salt: str = "") -> str:
        if bad_quote:
            return fake
        return quote if quote is not None else _quote(text, salt)

    if conv is not None:
        msgs = [{"role": m["role"], "content": " ".join(m["content"].split())} for m in conv]
        out: dict[str, Any] = {"messages": msgs}
        if passages:
            ev = q(passages[0][1])
            msgs[0] = {
                "role": "user",
                "content": f"In the document, what follows this? ({_tag(ev)}) {msgs[0]['content']}",
            }
            msgs[1] = {"role": "assistant", "content": f"The document says: {ev}"}
            out["evidence"] = ev
        return out
    if len(passages) > 1 or (passages and passages[0][0] is not None):
        ev = [{"passage": i + 1, "quote": q(p, str(i))} for i, (_, p) in enumerate(passages)]
        return {
            "question": f"How do the details {_tag(prompt)} of the passages relate?",
            "answer": " / ".join(e["quote"][:40] for e in ev),
            "evidence": ev,
        }
    passage = passages[0][1] if passages else prompt
    ev = q(passage)
    m = re.search(r"exactly (\d+) turns", prompt)
    if m:
        n = int(m.group(1))
        words = [w for w in re.findall(r"[A-Za-z0-9]+", ev) if len(w) > 3] or ["thing"]
        orig = words[len(words) // 2]
        new = f"NEW{_tag(prompt)}"
        turns = [{"user": f"What is said about {orig}?", "assistant": f"The document says {orig}."}]
        turns.append({"user": f"From now on treat {orig} as {new}.", "assistant": f"Understood: {new}."})
        turns += [{"user": "Anything else?", "assistant": "Not much."} for _ in range(n - 3)]
        turns.append(
            {
                "user": f"What was it originally ({_tag(prompt)}), and what is it now?",
                "assistant": f"Originally {orig}; now {new}.",
            }
        )
        return {"evidence": ev, "subject": orig, "original_value": orig, "new_value": new, "turns": turns}
    return {
        "question": f"Which statement of the document carries the mark {_tag(ev + prompt)}?",
        "answer": ev,
        "evidence": ev,
    }


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer(...) as srv:`; `srv.base_url` ends in /v1."""

    def __init__(
        self,
        faults: list[FaultRule] | None = None,
        api_key: str | None = None,
        model: str = "fake-model",
        latency: float = 0.0,
        responder: Callable[[str], dict[str, Any] | str] | None = None,
        refuse_json_mode: bool = False,
    ) -> None:
        self.refuse_json_mode = refuse_json_mode
        self.faults = faults or []
        self.api_key = api_key
        self.model = model
        self.latency = latency
        self.responder = responder
        self.calls: list[Call] = []
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if not self.path.split("?", 1)[0].endswith("/v1/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path.split('?', 1)[0]}"}})
                    return
                with server._lock:
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:
                    server._handle(self, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})

            def _send(
                self, status: int, payload: Any, headers: dict[str, str] | None = None, drip: float = 0.0
            ) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    if not drip:
                        self.wfile.write(data)
                        return
                    # 20 pieces, one every drip/20 seconds: each read returns quickly
                    step = max(1, -(-len(data) // 20))
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i : i + step])
                        self.wfile.flush()
                        if server._stop.wait(drip / 20):
                            return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # --- request handling ------------------------------------------------------------------------------
    def _action(self, prompt: str, ph: str) -> str:
        """What attempt k of this prompt gets: the k-th scripted action; past the script, "ok",
        except that content faults (a quote, a bad quote, invalid JSON) persist like a real model's."""
        with self._lock:
            k = self.attempts[ph]
            self.attempts[ph] += 1
            rule = next((r for r in self.faults if ph in r.claimed), None)
            if rule is None:
                for r in self.faults:
                    if not r.applies(prompt):
                        continue
                    if r.claim is None:
                        rule = r
                        break
                    if len(r.claimed) < r.claim:
                        r.claimed.add(ph)
                        rule = r
                        break
        if rule is None:
            return "ok"
        if k < len(rule.actions):
            return rule.actions[k]
        last = rule.actions[-1]
        return (
            last if last.startswith(("quote:", "bad_quote", "invalid_json", "unsupported_answer")) else "ok"
        )

    def _handle(self, h: Any, body: dict[str, Any]) -> None:
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        ph = hashlib.sha256(prompt.encode()).hexdigest()
        auth = h.headers.get("Authorization", "")
        path = h.path
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            with self._lock:
                self.calls.append(Call(time.time(), ph, "unauthorized", auth, body, path))
            # Like some real endpoints, echo the key that was sent: the client must redact it.
            got = auth.removeprefix("Bearer ")
            h._send(
                401,
                {"error": {"message": f"Incorrect API key provided: {got}", "type": "invalid_request_error"}},
            )
            return
        if self.refuse_json_mode and "response_format" in body:
            with self._lock:
                self.calls.append(Call(time.time(), ph, "400", auth, body, path))
            h._send(
                400,
                {"error": {"message": "response_format is not supported", "type": "invalid_request_error"}},
            )
            return
        action = self._action(prompt, ph)
        with self._lock:
            self.calls.append(Call(time.time(), ph, action, auth, body, path))
        if self.latency:
            time.sleep(self.latency)
        if action.startswith("429"):
            ra = action.split(":", 1)[1] if ":" in action else "0"
            h._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": ra})
            return
        if action in ("500", "502", "503", "401", "400"):
            h._send(int(action), {"error": {"message": f"scripted {action}", "type": "server_error"}})
            return
        if action.startswith("hang"):
            self._stop.wait(float(action.split(":", 1)[1]))
            h._send(500, {"error": {"message": "too late"}})
            return
        if action == "empty_choices":
            h._send(
                200, {"id": "chatcmpl-x", "object": "chat.completion", "model": self.model, "choices": []}
            )
            return
        if action == "invalid_json":
            content = "Sure! Here is the question you asked for: what is the {answer"
        elif self.responder is not None:
            r = self.responder(prompt)
            content = r if isinstance(r, str) else json.dumps(r)
        else:
            quote = action.split(":", 1)[1] if action.startswith("quote:") else None
            answer = default_answer(prompt, bad_quote=action == "bad_quote", quote=quote)
            if action == "unsupported_answer" and "answer" in answer:
                answer["answer"] = f"The moon base Tycho-{_tag(prompt)} was painted violet in 2291."
            if action == "echo_key":  # like a debugging proxy that reports what it received
                answer["note"] = f"received {auth} at {path}"
            content = json.dumps(answer)
        pt, ct = max(1, len(prompt) // 4), max(1, len(content) // 4)
        h._send(
            200,
            {
                "id": f"chatcmpl-{ph[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            },
            drip=float(action.split(":", 1)[1]) if action.startswith("drip:") else 0.0,
        )

    def actions(self) -> Counter[str]:
        with self._lock:
            return Counter(c.action.split(":")[0] for c in self.calls)
