"""What every column of every table Longloom publishes means: the card's Data Fields section.

The column list and types come from the Parquet files themselves; the meaning comes from here, by
table kind and dotted column path (`segments.row_token_start`: a field of each list element).
A column the files have and this registry does not describe shows up in the card as
"(not documented)" and fails `test_every_column_is_documented`, so a schema change (issue 17's
loss-mask and boundary columns, say) cannot reach a card silently: add its line here.

Positions follow one convention everywhere: token and character offsets are 0-based and spans are
half-open, [start, end); `record` numbers are 1-based lines for JSONL and 0-based rows for Parquet
(said again where they appear).
"""

from __future__ import annotations

import pyarrow as pa

_SEGMENT = {
    "source": "name of the source (`sources[].name` in the config)",
    "uri": "input file (or repository folder, or hub dataset) the document came from, relative to the config",
    "revision": "revision of that input: `sha256:` of the file, a git commit, or a hub revision",
    "record": "where the document sits in its input: the 1-based line of a JSONL file, the 0-based row of a "
    "Parquet file or hub split, 0 for a code repository (one document per repository)",
    "doc_id": "the document's id (`id_field`), or `<file>#<line>` when the input has none",
    "content_hash": "sha256 of the document's text (UTF-8), the key of exact deduplication",
    "char_start": "first character of this piece in the document (0-based, Unicode code points)",
    "char_end": "character after the last one of this piece (half-open span)",
    "byte_start": "first UTF-8 byte of this piece in the document (0-based)",
    "byte_end": "byte after the last one of this piece",
    "doc_token_start": "first token of this piece in the tokenized document (0-based)",
    "doc_token_end": "token after the last one of this piece",
    "doc_tokens": "length of the whole document in tokens (not just this piece)",
    "row_token_start": "position of the piece's first token in `input_ids` (0-based)",
    "row_token_end": "position after its last token; the separator, if any, sits at this position",
    "separator_after": "whether a separator token follows the piece (the end of the document)",
    "is_split": "whether the document is cut into pieces across rows (false: it sits whole here)",
    "part": "0-based index of this piece among the document's pieces, in document order",
    "placed_by": "the versioned packing step that placed the piece, e.g. `best_fit@1`",
    "neighbor_similarity": "cosine similarity to the previous piece in the row (similarity packing only; "
    "null otherwise)",
}
_LINEAGE = {
    "lineage": "how the row was made",
    "lineage.config_hash": "hash of the config settings that decide the bytes (see `manifest.json`)",
    "lineage.tokenizer": "tokenizer name as configured, e.g. `fastokens:llama3`",
    "lineage.tokenizer_hash": "hash of the tokenizer's vocabulary and special tokens",
    "lineage.longloom_version": "Longloom version that wrote the row",
    "lineage.seed": "the run's seed",
    "lineage.steps": "every versioned step the row went through, in order",
}
_MESSAGES = {
    "role": "`system`, `user` or `assistant`",
    "content": "the message text",
}

FIELD_DOCS: dict[str, dict[str, str]] = {
    "pretrain": {
        "row_id": "stable id of the row: `<config>-<0-based row number, 9 digits>`, the same on every rebuild",
        "input_ids": "token ids, exactly `target_length` of them: documents, separators, then padding",
        "length": "number of ids in `input_ids` (always `target_length`)",
        "target_length": "the configured row length",
        "n_pad": "padding tokens at the end of the row (positions `length - n_pad` to the end)",
        "n_segments": "number of document pieces in the row (entries of `segments`)",
        "cu_seqlens": "int32 offsets where each sequence of the row starts (a document with its separator; "
        "the padding at the end is one more), then the row length: FlashAttention's varlen `cu_seqlens` "
        "(present when `output.boundary_columns` lists it)",
        "position_ids": "int32 per token, restarting at 0 at every `cu_seqlens` offset (present when "
        "`output.boundary_columns` lists it; otherwise derive it from `cu_seqlens`)",
        "text": "the row decoded back to text (present when `output.store_text` is on)",
        "segments": "one entry per document piece in the row, in row order",
        **{f"segments.{k}": v for k, v in _SEGMENT.items()},
        **_LINEAGE,
    },
    "chat": {
        "sample_id": "stable id of the sample",
        "task": "what the sample asks for: `hash_chain`, `multi_needle`, `variable_tracking`, "
        "`aggregation`, `chunk_qa`, ...",
        "generator": "versioned generator that made it, e.g. `hash_chain@1`",
        "seed": "seed of this sample's generator",
        "params": "JSON of the task parameters",
        "messages": "the conversation, in order",
        **{f"messages.{k}": v for k, v in _MESSAGES.items()},
        "chat_template": "template used to render `messages` into tokens (`llama3`, `chatml`, ...)",
        "target_length": "the length class the sample was made for",
        "length": "tokens of the rendered sample, counted as `length_counts` says",
        "length_counts": "`full_chat` (whole rendered chat), `without_answers` or `context_only`",
        "context_tokens": "tokens of the long context inside the first user message",
        "evidence": "the pieces of the context an answer needs",
        "evidence.label": "what the piece is: `hash_pair`, `needle`, `assignment`, `quote`, ...",
        "evidence.message_index": "0-based index of the message that holds it",
        "evidence.char_start": "first character in that message's content (0-based)",
        "evidence.char_end": "character after the last one (half-open)",
        "evidence.token_start": "first token in the rendered, tokenized sample (0-based)",
        "evidence.token_end": "token after the last one",
        "evidence.depth": "`token_start` / context tokens: 0 = start of the context, 1 = its end",
        "questions": "the questions asked about the context, in order",
        "questions.message_index": "0-based index of the user message holding the question",
        "questions.text": "the question",
        "questions.expected": "every acceptable answer (`exact`), or the answer items (`set`, `ordered`)",
        "questions.match": "how an answer is graded: `exact`, `set` or `ordered`",
        "questions.token_start": "first token of the question in the rendered sample (0-based)",
        "questions.token_end": "token after its last one",
        "questions.evidence": "0-based indices into `evidence` of the pieces this question needs",
        "questions.dependency_distance": "question `token_start` minus the earliest needed evidence's "
        "`token_start`: how far back the model must look",
        "dependency_distance": "the largest `questions.dependency_distance` of the sample",
        "haystack": "lineage of the real text around the evidence, one entry per document piece; "
        "`row_token_start/end` give the span in the sample",
        **{f"haystack.{k}": v for k, v in _SEGMENT.items() if not k.startswith("row_token")},
        "haystack.row_token_start": "first token of this text in the rendered sample (0-based)",
        "haystack.row_token_end": "token after its last one",
        "model": "the LLM that wrote the sample (null for procedural samples)",
        "model.model": "model name as the endpoint reported it",
        "model.endpoint_host": "host of the endpoint (never a key, a user name or a query string)",
        "model.template": "prompt template name",
        "model.template_version": "prompt template version",
        "model.prompt_hash": "hash of the rendered prompt",
        "model.sampling": "JSON of the sampling parameters",
        "input_ids": "token ids of the rendered sample (chat template applied), when stored",
        "haystack_rows": "`row_id` of each packed row whose text is in the context",
        "loss_mask": "int8 per token of `input_ids`: 1 on the tokens a trainer learns (an assistant turn's "
        "content and its end-of-turn token; every assistant turn, or only the last with "
        "`output.loss_mask: final_answer`), 0 elsewhere",
        **_LINEAGE,
    },
    "eval": {
        "eval_id": "`<sample_id>/q<k>`: one row per question",
        "sample_id": "the synthesized sample the question belongs to",
        "question_index": "0-based index of the question within the sample",
        "task": "task of the sample",
        "generator": "versioned generator of the sample",
        "prompt": "the conversation up to the question: earlier turns with their reference answers, "
        "ending with the user's question",
        **{f"prompt.{k}": v for k, v in _MESSAGES.items()},
        "expected": "every acceptable answer, or the answer items",
        "match": "`exact`, `set` or `ordered` (see `longloom score`)",
        "depth": "depth of the earliest needed evidence in the context, 0..1",
        "evidence_depths": "depth of every needed piece of evidence, 0..1",
        "target_length": "the length class of the sample",
        "prompt_tokens": "tokens of the rendered prompt, generation header included",
        "dependency_distance": "tokens from the earliest needed evidence to the question",
        "chat_template": "template the prompt was rendered with",
    },
    "filtered": {
        "source": "source name",
        "uri": "input the document came from",
        "record": "1-based line (JSONL) or 0-based row (Parquet, hub) of the document",
        "doc_id": "document id",
        "content_hash": "sha256 of the document's text",
        "n_tokens": "the document's length in tokens",
        "step": "versioned step that dropped it, e.g. `exact_dedup@1`",
        "reason": "why: `too_short`, `exact_duplicate`, `source_budget`, `short_doc_downsampled`, ...",
        "detail": "the reason in words, e.g. `12 tokens < min_tokens=32`",
        "duplicate_of": "doc_id of the kept document it duplicates (dedup steps only)",
    },
    "pruned": {
        "source": "source name",
        "uri": "input the document came from",
        "record": "1-based line (JSONL) or 0-based row (Parquet, hub) of the document",
        "doc_id": "document id",
        "content_hash": "sha256 of the document's text",
        "n_tokens": "the document's length in tokens",
        "step": "the rule: `semdedup@1` (SemDeDup) or `d4@1` (D4)",
        "reason": "`semantic_duplicate` or `prototypical`",
        "similarity": "cosine similarity to `nearest_kept`",
        "nearest_kept": "doc_id of the most similar kept document of its cluster",
        "nearest_kept_hash": "content hash of that document",
        "threshold": "SemDeDup: the cosine threshold; D4: the cluster's cutoff",
        "cluster": "k-means cluster of the document's embedding",
        "cluster_size": "documents in that cluster",
        "centroid_similarity": "cosine similarity to the cluster centroid",
        "keep_rule": "which member of a duplicate group is kept, e.g. `longest`",
        "detail": "the decision in words",
    },
    "rewriter_audit": {
        "sample_id": "id the sample would have had (`<sample>/turn-k`: one QA turn of a several-turn sample)",
        "task": "rewriter task",
        "status": "`rejected` (failed validation) or `failed` (no usable answer); for one QA turn "
        "`turn_rejected` or `turn_failed`",
        "reason": "why, e.g. `evidence_not_found`, `http_429`, `budget_exhausted`",
        "detail": "the reason in words",
        "template": "prompt template name",
        "template_version": "prompt template version",
        "prompt_hash": "hash of the rendered prompt",
        "seed": "seed of the sample",
        "context_row": "`row_id` of the packed row the context came from",
        "attempts": "HTTP requests made (0: served from the cache or never sent)",
        "raw_response": "the model's answer as received, secrets redacted",
    },
    "quarantine": {
        "source": "source name",
        "uri": "input file",
        "record": "1-based line (JSONL) or 0-based row (Parquet, hub) that could not be read, if any",
        "member": "file inside a code repository, if the problem is there",
        "reason": "why it could not be read: `malformed_json`, `invalid_utf8`, `missing_text_field`, ...",
        "detail": "what is wrong and how to fix it",
        "raw": "the first bytes of the offending input, exactly as read (may hold anything the input held)",
    },
}


def table_kind_of(tag: str | None, config_kind: str) -> str:
    """The registry key of a table: its `longloom.table` tag's name, else the card's config kind."""
    name = (tag or "").split("@")[0]
    if name in FIELD_DOCS:
        return name
    return "pretrain" if config_kind == "pretrain" else name or config_kind


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_type
        return "list of structs" if pa.types.is_struct(inner) else f"list of {_type_name(inner)}"
    if pa.types.is_struct(t):
        return "struct"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    return str(t)


def columns(schema: pa.Schema) -> list[tuple[str, str]]:
    """(dotted path, type name) of every column and nested struct field, in schema order."""
    out: list[tuple[str, str]] = []

    def walk(prefix: str, t: pa.DataType) -> None:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        if pa.types.is_struct(t):
            for i in range(t.num_fields):
                f = t.field(i)
                out.append((f"{prefix}.{f.name}", _type_name(f.type)))
                walk(f"{prefix}.{f.name}", f.type)

    for f in schema:
        out.append((f.name, _type_name(f.type)))
        walk(f.name, f.type)
    return out


def describe(kind: str, path: str) -> str | None:
    return FIELD_DOCS.get(kind, {}).get(path)
