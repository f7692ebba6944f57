"""Arrow schemas of every table Longloom writes: one definition per record type.

Writers build tables against these schemas, readers and tests check against them, and the dataset
card derives its `dataset_info.features` from them. Change a schema here and bump its version.
"""

from __future__ import annotations

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
        pa.field("placed_by", pa.string()),  # versioned packing step, e.g. "best_fit@1"
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


def row_schema(store_text: bool) -> pa.Schema:
    """Schema of a packed pretraining row; `text` is present only when the config stores it."""
    fields = [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("length", pa.int32(), nullable=False),  # == len(input_ids) == target_length
        pa.field("target_length", pa.int32(), nullable=False),
        pa.field("n_pad", pa.int32(), nullable=False),  # padding tokens at the end of the row
        pa.field("n_segments", pa.int32(), nullable=False),
    ]
    if store_text:
        fields.append(pa.field("text", pa.large_string()))
    fields += [
        pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False),
        pa.field("lineage", LINEAGE_TYPE, nullable=False),
    ]
    return pa.schema(fields, metadata={"longloom.table": "pretrain@1"})


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
        pa.field("length_counts", pa.string(), nullable=False),  # "full_chat" | "without_answers"
        pa.field("context_tokens", pa.int32(), nullable=False),
        pa.field("evidence", pa.list_(EVIDENCE_TYPE), nullable=False),
        pa.field("questions", pa.list_(QUESTION_TYPE), nullable=False),
        pa.field("dependency_distance", pa.int64(), nullable=False),  # max over the sample's questions
        pa.field("haystack", pa.list_(SEGMENT_TYPE), nullable=False),  # lineage of the real text around it
        pa.field("model", MODEL_TYPE),  # null for procedural samples
        pa.field("lineage", LINEAGE_TYPE, nullable=False),
    ],
    metadata={"longloom.table": "chat@1"},
)
