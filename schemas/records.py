"""Arrow schemas of every table Longloom writes: one definition per record type.

Writers build tables against these schemas, readers and tests check against them, and the dataset
card derives its `dataset_info.features` from them. Change a schema here and bump its version.

Changes:
- chat@2 (issue 4, additive): CHAT_SCHEMA gains nullable `input_ids` (the rendered sample's token ids)
  and `haystack_rows` (row_id of each packed row whose text is in the context); `length_counts` may
  also be "context_only". `haystack` segments give the span in the *sample* in row_token_start/end.
  Build tables with `pipeline.synth.chat.chat_table`, which fills nullable columns a writer leaves out.
- EVAL_SCHEMA (issue 4, new): one row per question of a synthesized sample, for evaluation.
- chat@3 (issue 17, additive): CHAT_SCHEMA gains nullable `loss_mask` (int8 per token of `input_ids`:
  1 on the assistant tokens a trainer learns, see `LOSS_MASK_FIELD`).
- pretrain@2 (issue 17, additive): packed rows may carry `cu_seqlens` and `position_ids`
  (`BOUNDARY_FIELDS`, chosen by `output.boundary_columns`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

# --- raw documents, as readers produce them --------------------------------------------------------

RAW_DOC_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),  # input file (relative to the config) or dataset id
        pa.field("record", pa.int64(), nullable=False),  # 1-based line (JSONL) or 0-based row (Parquet, HF)
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
    ]
)

# --- quarantine: input that could not become a document ---------------------------------------------

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("record", pa.int64()),  # line or row, where the input has one
        pa.field("member", pa.string()),  # a file inside a repository, where the input has one
        pa.field(
            "reason", pa.string(), nullable=False
        ),  # machine-readable: malformed_json, invalid_utf8, ...
        pa.field("detail", pa.string(), nullable=False),  # what is wrong and how to fix it
        pa.field("raw", pa.binary()),  # the first bytes of the offending input, for inspection
    ],
    metadata={"longloom.table": "quarantine@1"},
)

# --- filtered: documents a filter dropped, each with its reason -------------------------------------

FILTERED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("record", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("step", pa.string(), nullable=False),  # versioned step name, e.g. "min_tokens@1"
        pa.field("reason", pa.string(), nullable=False),  # e.g. "too_short"
        pa.field("detail", pa.string(), nullable=False),  # e.g. "12 tokens < min_tokens=32"
        pa.field("duplicate_of", pa.string()),  # doc_id of the kept document, for dedup steps
    ],
    metadata={"longloom.table": "filtered@1"},
)

# --- pruned: documents the diversity stage removed, with what explains each decision -----------------
# Every pruned document is also a `filtered` row (same step and reason), so counts reconcile; this table
# adds what is needed to check the decision from the embeddings (manifest extra["diversity"] names the
# embedder, its cache key and the chunking).

PRUNED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("record", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("step", pa.string(), nullable=False),  # the rule: "semdedup@1" or "d4@1"
        pa.field("reason", pa.string(), nullable=False),  # "semantic_duplicate" or "prototypical"
        pa.field("similarity", pa.float32(), nullable=False),  # cosine to nearest_kept
        pa.field("nearest_kept", pa.string()),  # doc_id of the most similar kept document of the cluster
        pa.field("nearest_kept_hash", pa.string()),
        pa.field("threshold", pa.float32(), nullable=False),  # semdedup: cosine threshold; d4: cluster cutoff
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("cluster_size", pa.int32(), nullable=False),
        pa.field("centroid_similarity", pa.float32(), nullable=False),
        pa.field("keep_rule", pa.string(), nullable=False),  # e.g. "longest", "farthest_from_centroid"
        pa.field("detail", pa.string(), nullable=False),
    ],
    metadata={"longloom.table": "pruned@1"},
)

# --- tokenized documents: the intermediate between prepare and pack ---------------------------------
# The token ids themselves sit beside this table in a raw little-endian int32 file per input shard
# (`tokens/<shard>.int32`, documents back to back in table order), so the write stage reads exactly
# the spans it packs instead of decoding whole Parquet row groups.

DOC_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("record", pa.int64(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # sha256 of the UTF-8 text, hex
        pa.field("n_chars", pa.int64(), nullable=False),
        pa.field("n_bytes", pa.int64(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("token_start", pa.int64(), nullable=False),  # first token's index in the tokens file
    ],
    metadata={"longloom.table": "documents@2"},
)

# --- packed rows --------------------------------------------------------------------------------------

SEGMENT_TYPE = pa.struct(
    [
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("revision", pa.string()),  # sha256 of the input file, git commit, or hub revision
        pa.field("record", pa.int64()),
        pa.field("doc_id", pa.string()),
        pa.field("content_hash", pa.string()),
        # span of this piece in the source document: characters, UTF-8 bytes, and document tokens
        pa.field("char_start", pa.int64()),
        pa.field("char_end", pa.int64()),
        pa.field("byte_start", pa.int64()),
        pa.field("byte_end", pa.int64()),
        pa.field("doc_token_start", pa.int64()),
        pa.field("doc_token_end", pa.int64()),
        pa.field("doc_tokens", pa.int64()),  # length of the whole document in tokens
        # where the piece sits in the row; a separator token follows at row_token_end if separator_after
        pa.field("row_token_start", pa.int32()),
        pa.field("row_token_end", pa.int32()),
        pa.field("separator_after", pa.bool_()),
        pa.field("is_split", pa.bool_()),  # the document does not sit whole in this row
        pa.field("part", pa.int32()),  # 0-based index of this piece among the document's pieces
        pa.field("placed_by", pa.string()),  # versioned packing step, e.g. "best_fit@2"
        pa.field("neighbor_similarity", pa.float32()),  # cosine to the previous segment (similarity packing)
    ]
)

LINEAGE_TYPE = pa.struct(
    [
        pa.field("config_hash", pa.string()),
        pa.field("tokenizer", pa.string()),
        pa.field("tokenizer_hash", pa.string()),
        pa.field("longloom_version", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("steps", pa.list_(pa.string())),  # every versioned step the row went through, in order
    ]
)


# --- document boundaries of a row (`output.boundary_columns`, `longloom export --with-boundaries`) ----
# `cu_seqlens`: offsets where each sequence of the row starts, then the row's length (a document with its
# separator is one sequence; the padding at the end is one more). `position_ids`: one per token,
# restarting at 0 at every sequence. What FlashAttention's varlen kernels and packed-sequence
# training take, so that no token attends across a document boundary.
BOUNDARY_FIELDS: tuple[pa.Field, pa.Field] = (
    pa.field("cu_seqlens", pa.list_(pa.int32()), nullable=False),
    pa.field("position_ids", pa.list_(pa.int32()), nullable=False),
)


def row_schema(store_text: bool, boundary_columns: Sequence[str] = ()) -> pa.Schema:
    """Schema of a packed pretraining row; `text` is present only when the config stores it, and the
    `BOUNDARY_FIELDS` named in `boundary_columns` (`output.boundary_columns`) follow `n_segments`."""
    fields = [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("length", pa.int32(), nullable=False),  # == len(input_ids) == target_length
        pa.field("target_length", pa.int32(), nullable=False),
        pa.field("n_pad", pa.int32(), nullable=False),  # padding tokens at the end of the row
        pa.field("n_segments", pa.int32(), nullable=False),
    ]
    fields += [f for f in BOUNDARY_FIELDS if f.name in boundary_columns]
    if store_text:
        fields.append(pa.field("text", pa.large_string()))
    fields += [
        pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False),
        pa.field("lineage", LINEAGE_TYPE, nullable=False),
    ]
    return pa.schema(fields, metadata={"longloom.table": "pretrain@2"})


# --- synthesized chat samples (procedural generators and the LLM rewriter) ---------------------------

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.large_string())])

# Token positions are in the sample rendered with the configured chat template and tokenized.
EVIDENCE_TYPE = pa.struct(
    [
        pa.field(
            "label", pa.string()
        ),  # what the piece is: "hash_pair", "needle", "assignment", "quote", ...
        pa.field("message_index", pa.int32()),
        pa.field("char_start", pa.int64()),  # in that message's content
        pa.field("char_end", pa.int64()),
        pa.field("token_start", pa.int64()),  # in the rendered, tokenized sample
        pa.field("token_end", pa.int64()),
        pa.field("depth", pa.float32()),  # token_start / context tokens, 0 = start of the context
    ]
)

QUESTION_TYPE = pa.struct(
    [
        pa.field("message_index", pa.int32()),
        pa.field("text", pa.large_string()),
        pa.field("expected", pa.list_(pa.string())),  # every acceptable answer, or the answer set
        pa.field("match", pa.string()),  # "exact" | "set" | "ordered"
        pa.field("token_start", pa.int64()),
        pa.field("token_end", pa.int64()),
        pa.field("evidence", pa.list_(pa.int32())),  # indices into the sample's evidence list
        pa.field(
            "dependency_distance", pa.int64()
        ),  # question token_start - earliest needed evidence token_start
    ]
)

MODEL_TYPE = pa.struct(
    [
        pa.field("model", pa.string()),
        pa.field("endpoint_host", pa.string()),  # host only: never the key, never a query string
        pa.field("template", pa.string()),
        pa.field("template_version", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("sampling", pa.string()),  # JSON of the sampling parameters
    ]
)

# 1 for every token a trainer learns (an assistant turn's content and its end-of-turn token), 0 elsewhere,
# aligned with `input_ids`; which assistant turns count is `output.loss_mask` ("all_assistant_turns" or
# "final_answer"). Labels for a causal-LM loss: `labels = where(loss_mask == 1, input_ids, -100)`.
LOSS_MASK_FIELD = pa.field("loss_mask", pa.list_(pa.int8()))

CHAT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),  # hash_chain, multi_needle, chunk_qa, ...
        pa.field("generator", pa.string(), nullable=False),  # versioned, e.g. "hash_chain@1"
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("params", pa.string(), nullable=False),  # JSON of the task parameters
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("chat_template", pa.string(), nullable=False),
        pa.field("target_length", pa.int32(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),  # tokens counted under `length_counts`
        pa.field(
            "length_counts", pa.string(), nullable=False
        ),  # "full_chat" | "without_answers" | "context_only"
        pa.field("context_tokens", pa.int32(), nullable=False),
        pa.field("evidence", pa.list_(EVIDENCE_TYPE), nullable=False),
        pa.field("questions", pa.list_(QUESTION_TYPE), nullable=False),
        pa.field("dependency_distance", pa.int64(), nullable=False),  # max over the sample's questions
        pa.field("haystack", pa.list_(SEGMENT_TYPE), nullable=False),  # lineage of the real text around it
        pa.field("model", MODEL_TYPE),  # null for procedural samples
        pa.field("lineage", LINEAGE_TYPE, nullable=False),
        pa.field("input_ids", pa.list_(pa.int32())),  # the rendered sample (chat template applied)
        pa.field("haystack_rows", pa.list_(pa.string())),  # packed rows the context text came from
        LOSS_MASK_FIELD,
    ],
    metadata={"longloom.table": "chat@3"},
)

# One row per question: the prompt up to that question (earlier turns with their reference answers),
# what a correct answer is, and where the evidence lies.
EVAL_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string(), nullable=False),  # "<sample_id>/q<k>"
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("question_index", pa.int32(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("generator", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),  # ends with the user's question
        pa.field("expected", pa.list_(pa.string()), nullable=False),
        pa.field("match", pa.string(), nullable=False),  # "exact" | "set" | "ordered"
        pa.field("depth", pa.float32(), nullable=False),  # of the earliest needed evidence, 0..1
        pa.field("evidence_depths", pa.list_(pa.float32()), nullable=False),
        pa.field("target_length", pa.int32(), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),  # rendered prompt + generation header
        pa.field("dependency_distance", pa.int64(), nullable=False),
        pa.field("chat_template", pa.string(), nullable=False),
    ],
    metadata={"longloom.table": "eval@1"},
)

# --- LLM rewriter audit: every requested sample that was not kept, with the raw answer -----------------

REWRITER_AUDIT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field(
            "status", pa.string(), nullable=False
        ),  # "rejected" (validation) | "failed" (no usable answer) | "turn_rejected" / "turn_failed" (one QA turn)
        pa.field(
            "reason", pa.string(), nullable=False
        ),  # e.g. evidence_not_found, http_429, budget_exhausted
        pa.field("detail", pa.string(), nullable=False),
        pa.field("template", pa.string()),
        pa.field("template_version", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("context_row", pa.string()),  # the packed row the context came from
        pa.field(
            "attempts", pa.int32()
        ),  # requests the recorded answer took (failed: this run's; 0: never sent)
        pa.field("raw_response", pa.large_string()),  # the model's answer as received (secrets redacted)
    ],
    metadata={"longloom.table": "rewriter_audit@1"},
)

# The select stage's layout of one target: where each piece of each document goes (one row per piece).
LAYOUT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32()),  # index into the prepared shards, in canonical order
        pa.field("doc_row", pa.int64()),  # row of the document in that shard's documents file
        pa.field("start", pa.int64()),  # footprint span in the document (tokens + separator)
        pa.field("end", pa.int64()),
        pa.field("row", pa.int64()),
        pa.field("row_start", pa.int64()),
        pa.field("part", pa.int32()),
        pa.field("neighbor_similarity", pa.float32()),
    ]
)
