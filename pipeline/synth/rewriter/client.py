"""Async client for any OpenAI-compatible chat endpoint: bounded concurrency, retries that honour
`Retry-After`, a per-run request budget, the response cache, and token/cost accounting per template.

Failures never raise out of `complete`: a request that cannot be answered comes back as a failed
`ChatResult` with a machine-readable reason, so a run records it instead of crashing or losing it.

`rewriter.concurrency` bounds the requests in flight to one endpoint across every task of this
process (`SharedLimit`), so a thread runner with N workers still sends at most `concurrency` at once.
Each `timeout_seconds` is a deadline for the whole request (connect, send, every byte of the answer),
not per read: a body dripped slowly is cut off like a silent one.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.synth.rewriter.cache import ResponseCache
from pipeline.synth.rewriter.secrets import Redactor, redact_http_logs
from schemas.redact import redact_url, split_query
from schemas.synthesis import RewriterConfig

if TYPE_CHECKING:
    # imported where a request is made: the SDK is large (over 500 modules), and every build imports
    # the rewriter stage's module through the stage list, rewriter on or off
    import openai


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for; everything that determines the answer, and nothing secret."""

    template: str
    template_version: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: tuple[tuple[str, Any], ...]  # sorted (name, value)
    response_format: str | None  # canonical JSON of the response_format field, or None

    @classmethod
    def build(
        cls,
        template: str,
        version: str,
        messages: list[dict[str, str]],
        sampling: dict[str, Any],
        response_format: dict[str, Any] | None,
    ) -> ChatRequest:
        return cls(
            template=template,
            template_version=version,
            messages=tuple((m["role"], m["content"]) for m in messages),
            sampling=tuple(sorted(sampling.items())),
            response_format=_canonical(response_format) if response_format else None,
        )

    @property
    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def sampling_json(self) -> str:
        return _canonical(dict(self.sampling))

    @property
    def prompt_hash(self) -> str:
        """sha256 of the rendered prompt messages alone."""
        return hashlib.sha256(_canonical(self.message_dicts).encode()).hexdigest()

    def cache_key(self, model: str) -> str:
        """sha256 over (model, template name+version, prompt, sampling params, response format)."""
        payload = {
            "model": model,
            "template": self.template,
            "template_version": self.template_version,
            "messages": self.message_dicts,
            "sampling": dict(self.sampling),
            "response_format": self.response_format,
        }
        return hashlib.sha256(_canonical(payload).encode()).hexdigest()


@dataclass
class ChatResult:
    ok: bool
    content: str | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    attempts: int = 0  # HTTP requests made for this result in this run (0 when served from the cache)
    answer_attempts: int = 0  # HTTP requests it took to get this answer when it was fetched (cached too)
    error_reason: str | None = None  # http_429, http_500, timeout, connection, budget_exhausted, ...
    error_detail: str | None = None  # redacted
    json_mode_used: bool = False


class RequestBudget:
    """A cap on HTTP requests (every attempt counts); thread-safe, `None` means unlimited."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                return False
            self.used += 1
            return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass
class TemplateUsage:
    """Token and cost accounting of one template (live calls; cache hits kept apart)."""

    requests: int = 0  # HTTP attempts sent
    responses: int = 0  # live successful responses
    cache_hits: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    retry_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # tokens of responses served from the cache (not paid again)
    cached_completion_tokens: int = 0
    cost: float = 0.0
    seconds_waiting: float = 0.0  # backoff and Retry-After sleeps

    def merge(self, other: TemplateUsage) -> None:
        for k, v in asdict(other).items():
            if isinstance(v, dict):
                mine = getattr(self, k)
                for kk, vv in v.items():
                    mine[kk] = mine.get(kk, 0) + vv
            else:
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = round(self.cost, 6)
        d["seconds_waiting"] = round(self.seconds_waiting, 3)
        return d


def retry_after_seconds(headers: Any) -> float | None:
    """Delay a 429/503 asks for: `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    when = email.utils.parsedate_to_datetime(ra) if ra else None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


_RETRYABLE_STATUS = {408, 409, 425, 429}


class SharedLimit:
    """A counting semaphore shared by the event loops of several threads (one per rewriter task).

    `asyncio.Semaphore` belongs to one loop; a `threading.Semaphore` would block a loop while it waits.
    Waiters here are futures of their own loops, woken thread-safely in arrival order.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._lock = threading.Lock()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.in_flight = 0
        self.peak = 0  # most permits held at once (what the endpoint saw at most)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._take()
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                waiting = (loop, fut) in self._waiters
                if waiting:
                    self._waiters.remove((loop, fut))
            if not waiting and fut.done() and not fut.cancelled():
                self.release()  # granted just before the cancel arrived: hand the permit on
            raise  # (a grant still on its way finds the future cancelled and hands it on itself)

    def _take(self) -> None:
        self._free -= 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def _grant(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            self.release()
        else:
            fut.set_result(None)

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._free += 1
            while self._waiters:
                loop, fut = self._waiters.popleft()
                self._take()
                try:
                    loop.call_soon_threadsafe(self._grant, fut)
                except RuntimeError:  # that loop has closed: its waiter is gone, try the next one
                    self._free += 1
                    self.in_flight -= 1
                    continue
                return

    async def __aenter__(self) -> SharedLimit:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


_LIMITS: dict[tuple[str, int], SharedLimit] = {}
_LIMITS_LOCK = threading.Lock()


def shared_limit(base_url: str, concurrency: int) -> SharedLimit:
    """The process-wide limit of requests in flight to one endpoint."""
    key = (redact_url(base_url), concurrency)
    with _LIMITS_LOCK:
        if key not in _LIMITS:
            _LIMITS[key] = SharedLimit(concurrency)
        return _LIMITS[key]


class RewriterClient:
    """Sends `ChatRequest`s to the endpoint with at most `concurrency` in flight (in this process)."""

    def __init__(
        self,
        cfg: RewriterConfig,
        api_key: str,
        cache: ResponseCache,
        budget: RequestBudget,
        redactor: Redactor,
        concurrency: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.budget = budget
        self.redact = redactor
        self.usage: dict[str, TemplateUsage] = {}
        self._api_key = api_key
        self.limit = shared_limit(cfg.base_url, concurrency or cfg.concurrency)
        self._client: openai.AsyncOpenAI | None = None
        self._json_refused = False  # the endpoint said no to response_format: parse tolerantly instead
        price = cfg.prices.get(cfg.model)
        self._price = (price.prompt_per_million, price.completion_per_million) if price else (0.0, 0.0)

    async def __aenter__(self) -> RewriterClient:
        # the SDK appends paths to the base URL's raw path, so a query string there would end up in
        # the middle of every request path: it is sent as default query parameters instead
        base, query = split_query(self.cfg.base_url)
        redact_http_logs(self.redact.secrets)  # httpx logs every request URL, query string included
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=base,
            api_key=self._api_key,
            default_query=query or None,
            max_retries=0,  # retries are ours: counted, budgeted, and Retry-After aware
            timeout=self.cfg.timeout_seconds,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = None

    def _usage(self, template: str) -> TemplateUsage:
        return self.usage.setdefault(template, TemplateUsage())

    async def complete(self, req: ChatRequest) -> ChatResult:
        """The response for `req`: from the cache, or from the endpoint with retries; never raises."""
        u = self._usage(req.template)
        key = req.cache_key(self.cfg.model)
        hit = self.cache.get(key)
        if hit is not None:
            u.cache_hits += 1
            u.cached_prompt_tokens += int(hit.get("prompt_tokens", 0))
            u.cached_completion_tokens += int(hit.get("completion_tokens", 0))
            return ChatResult(
                ok=True,
                content=hit.get("content"),
                finish_reason=hit.get("finish_reason"),
                response_model=hit.get("response_model"),
                prompt_tokens=int(hit.get("prompt_tokens", 0)),
                completion_tokens=int(hit.get("completion_tokens", 0)),
                cached=True,
                answer_attempts=int(hit.get("attempts", 0)),
                json_mode_used=bool(hit.get("json_mode_used")),
            )
        assert self._client is not None, "use RewriterClient as an async context manager"
        async with self.limit:
            res = await self._send(req, u)
        if res.ok:
            self.cache.put(
                key,
                {
                    "content": res.content,  # already redacted: no secret reaches the disk
                    "attempts": res.attempts,
                    "finish_reason": res.finish_reason,
                    "response_model": res.response_model,
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "json_mode_used": res.json_mode_used,
                    "template": req.template,
                    "template_version": req.template_version,
                },
            )
        else:
            reason = res.error_reason or "unknown"
            u.failures[reason] = u.failures.get(reason, 0) + 1
        return res

    def _backoff(self, attempt: int) -> float:
        base = self.cfg.backoff_seconds * (2 ** (attempt - 1))
        return min(self.cfg.backoff_max_seconds, base) * (0.5 + random.random() / 2)

    async def _send(self, req: ChatRequest, u: TemplateUsage) -> ChatResult:
        import openai

        assert self._client is not None
        attempts = 0
        last_reason, last_detail = "unknown", ""
        while attempts < self.cfg.max_attempts:
            if not self.budget.take():
                return ChatResult(
                    ok=False,
                    attempts=attempts,
                    error_reason="budget_exhausted",
                    error_detail=f"request budget of {self.budget.limit} used up"
                    + (f"; last error {last_reason}: {last_detail}" if attempts else ""),
                )
            attempts += 1
            u.requests += 1
            use_json = req.response_format is not None and not self._json_refused
            kwargs: dict[str, Any] = dict(req.sampling)
            if use_json:
                kwargs["response_format"] = json.loads(req.response_format or "null")
            delay: float | None = None
            try:
                # the SDK's timeout applies to each read; wait_for makes it a deadline for the request
                resp = await asyncio.wait_for(
                    self._client.chat.completions.create(
                        model=self.cfg.model,
                        messages=req.message_dicts,  # type: ignore[arg-type]
                        **kwargs,
                    ),
                    timeout=self.cfg.timeout_seconds,
                )
            except (openai.APITimeoutError, TimeoutError):
                last_reason, last_detail = (
                    "timeout",
                    f"no complete response within {self.cfg.timeout_seconds}s",
                )
            except openai.APIConnectionError as err:
                last_reason, last_detail = "connection", self.redact(str(err))[:500]
            except openai.APIStatusError as err:
                status = err.status_code
                last_reason, last_detail = f"http_{status}", self.redact(str(err))[:500]
                if (
                    status == 400
                    and use_json
                    and "response_format" in str(err).lower() + str(err.body).lower()
                ):
                    # JSON mode unsupported here: ask again without it, once for the whole run.
                    self._json_refused = True
                    attempts -= 1
                    continue
                if status not in _RETRYABLE_STATUS and status < 500:
                    return ChatResult(
                        ok=False, attempts=attempts, error_reason=last_reason, error_detail=last_detail
                    )
                ra = retry_after_seconds(err.response.headers if err.response is not None else None)
                if ra is not None:
                    delay = min(ra, self.cfg.retry_after_max_seconds)
            except Exception as err:  # a malformed body the SDK cannot parse, and the like
                last_reason, last_detail = "bad_response", self.redact(f"{type(err).__name__}: {err}")[:500]
            else:
                usage = resp.usage
                pt = int(usage.prompt_tokens or 0) if usage else 0
                ct = int(usage.completion_tokens or 0) if usage else 0
                u.prompt_tokens += pt  # paid for, whatever the body holds
                u.completion_tokens += ct
                u.cost += (pt * self._price[0] + ct * self._price[1]) / 1e6
                if not resp.choices:
                    # a 200 without choices is the endpoint failing, not the model answering "":
                    # retried like a 5xx, and never cached (the cache only holds answers)
                    last_reason, last_detail = "empty_choices", "200 response with no choices"
                else:
                    choice = resp.choices[0]
                    u.responses += 1
                    content = (choice.message.content if choice.message else None) or ""
                    return ChatResult(
                        ok=True,
                        # an endpoint may echo the key; it must reach neither the cache nor a sample
                        content=self.redact(content),
                        finish_reason=choice.finish_reason,
                        response_model=resp.model,
                        prompt_tokens=pt,
                        completion_tokens=ct,
                        attempts=attempts,
                        answer_attempts=attempts,
                        json_mode_used=use_json,
                    )
            if attempts >= self.cfg.max_attempts:
                break
            u.retries += 1
            u.retry_reasons[last_reason] = u.retry_reasons.get(last_reason, 0) + 1
            wait = delay if delay is not None else self._backoff(attempts)
            u.seconds_waiting += wait
            await asyncio.sleep(wait)
        return ChatResult(
            ok=False,
            attempts=attempts,
            error_reason=last_reason,
            error_detail=f"gave up after {attempts} attempts: {last_detail}",
        )
