"""Chat templates rendered straight to token ids, and token-exact assembly of long contexts.

Shared by the procedural generators (issue 4) and the LLM rewriter (issue 5). The rooms: `templates`
(rendering), `boundaries` (token/char positions, safe boundaries), `haystack` (real rows tokenized
once), `assemble` (sizing a sample exactly), `table` (the output table), `jinja` (a model's own
chat_template), `loader` (which template a config names); `base` holds the shared
literals and errors. Everything is importable from this package.

Templates. A template turns a messages list into token ids and records where every message and its
content sit. Structure tokens (`<|start_header_id|>`, `<|im_start|>`, ...) are special ids; role names,
the line breaks after headers and every message content are tokenized as ordinary text, each piece on
its own, so a document that spells a special token stays text. For content that does not start with
whitespace (Meta's template trims content), the ids equal a whole-string tokenization of
`render_text()` with special tokens allowed. Built in: "llama3" (Meta's Llama-3 format) and "chatml"
(Qwen-style `<|im_start|>role\\n ... <|im_end|>\\n`).

Assembly. `assemble_chat` builds a sample whose counted length (see `LengthCounts`) is exactly the
target, from real haystack text and pieces (needles, evidence) to insert at given depths. It works on
token ids, not by re-tokenizing the context per try (RULER binary-searched over re-tokenizations):

- the haystack is tokenized once (`Haystack`);
- pieces go in only at *safe boundaries*, where a regex-pretokenized BPE (tiktoken/Llama-3/Qwen
  style) always splits, so tok(A + piece + B) == tok(A) + tok(piece) + tok(B):
  "line" boundaries right after a line break followed by a non-space character (a line piece is
  `text + "\\n"`), and "inline" boundaries before a space that follows a non-space character
  (an inline piece is `" " + sentence`; sentence ends are preferred, so it reads as part of the prose);
- the haystack is cut at a safe boundary a few tokens short of the budget, and the last tokens come
  from re-tokenizing a short window (haystack tail + the context terminator) at a few candidate cut
  points until the count is exact;
- the whole sample is then tokenized once from its text and compared with the assembled ids
  (`AssemblyError` if they differ), so a tokenizer that breaks the boundary assumption cannot
  produce a silently wrong sample.

Positions are reported per piece (char span in the message content, token span in the sample) and per
haystack run (what text of which source segment ended where), so callers can record lineage.
"""

from pipeline.synth.chat.assemble import AssembledChat, HaystackRun, Piece, PlacedPiece, assemble_chat
from pipeline.synth.chat.base import AssemblyError, HaystackTooShort, LengthCounts, Placement
from pipeline.synth.chat.boundaries import (
    BoundaryTables,
    boundary_tables,
    chars_to_tokens,
    decode_ordinary,
    safe_boundaries,
    token_bytes,
    token_char_starts,
)
from pipeline.synth.chat.haystack import Haystack, HaystackPart
from pipeline.synth.chat.loader import load_template
from pipeline.synth.chat.table import chat_table
from pipeline.synth.chat.templates import (
    ROLES,
    TEMPLATES,
    ChatTemplate,
    RenderedChat,
    TemplateSpec,
)

__all__ = [
    "ROLES",
    "TEMPLATES",
    "AssembledChat",
    "AssemblyError",
    "BoundaryTables",
    "ChatTemplate",
    "Haystack",
    "HaystackPart",
    "HaystackRun",
    "HaystackTooShort",
    "LengthCounts",
    "Piece",
    "PlacedPiece",
    "Placement",
    "RenderedChat",
    "TemplateSpec",
    "assemble_chat",
    "boundary_tables",
    "chars_to_tokens",
    "chat_table",
    "decode_ordinary",
    "load_template",
    "safe_boundaries",
    "token_bytes",
    "token_char_starts",
]
