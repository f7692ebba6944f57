"""Config for embedding-based pruning and related-document grouping (issue 3), the `diversity:` section.

diversity:
  embedder: static-tokens        # or minilm, static-minilm, st:<path|hub id>, model2vec:<path|hub id>; null = off
  semdedup: {threshold: 0.9, keep: longest}
  d4: {keep_fraction: 0.8}       # optional: keep 80% per cluster, the least prototypical
  grouping: {docs_per_cluster: 1000}
packing: {strategy: similarity}  # related documents side by side in a row
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EMBEDDER_NAMES = ("minilm", "static-minilm", "static-tokens")
EMBEDDER_PREFIXES = ("st:", "model2vec:")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KMeansConfig(_Strict):
    """Spherical k-means (faiss), fitted on a seeded sample when the set is large."""

    clusters: int | None = Field(
        default=None, ge=1, description="Number of clusters; None = documents / docs_per_cluster."
    )
    docs_per_cluster: int = Field(default=1000, ge=2, description="Target cluster size when clusters=None.")
    iterations: int = Field(default=20, ge=1, le=1000)
    sample_per_cluster: int = Field(
        default=256, ge=39, description="Fit on at most clusters x this many documents (faiss needs >= 39)."
    )


class IndexConfig(_Strict):
    """Neighbour search inside a cluster: exact (flat) when small, approximate when large."""

    flat_max: int = Field(
        default=16384, ge=2, description="Clusters up to this size are searched exactly, in blocks."
    )
    kind: Literal["hnsw", "ivf"] = Field(default="hnsw", description="Approximate index for larger clusters.")
    neighbors: int = Field(default=32, ge=1, le=1024, description="Neighbours fetched per document (ANN).")
    hnsw_m: int = Field(default=32, ge=4, le=256)
    ef_search: int = Field(default=128, ge=8)
    ivf_lists: int | None = Field(default=None, ge=1, description="IVF lists; None = 4 x sqrt(cluster size).")
    nprobe: int = Field(default=8, ge=1)


class LexicalConfig(_Strict):
    """Lexical confirmation before a semantic drop: the pair's token-id shingles must overlap
    (Jaccard of `shingle_tokens`-grams, bottom-k sketches; pipeline/corpus/semantic/lexical.py)."""

    enabled: bool | None = Field(
        default=None,
        description="None = on for static embedders (static-minilm, static-tokens, model2vec:), off otherwise.",
    )
    shingle_tokens: int = Field(default=3, ge=1, le=64, description="Tokens per shingle.")
    min_jaccard: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="A pair counts as a near-duplicate only at this Jaccard or above.",
    )
    sketch: int = Field(
        default=512,
        ge=16,
        le=65536,
        description="Smallest shingle hashes kept per document (exact below that).",
    )


class SemDedupConfig(_Strict):
    """SemDeDup (Abbas et al. 2023): inside each k-means cluster, drop documents too close to a kept one."""

    enabled: bool = True
    threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Cosine similarity above which a document is a duplicate; None = the embedder's calibrated "
            "default (0.85 for transformer models such as minilm, 0.97 for static models)."
        ),
    )
    keep: Literal["longest", "shortest", "first", "farthest_from_centroid", "nearest_to_centroid"] = Field(
        default="longest",
        description="Which document of a near-duplicate group is kept; ties go to the earlier document.",
    )
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)
    lexical: LexicalConfig = Field(default_factory=LexicalConfig)
    boundary_margin: Literal["auto"] | float | None = Field(
        default="auto",
        description=(
            "Near-duplicates that k-means splits across clusters: a document whose second-nearest centroid "
            "is within this cosine of its nearest is also compared, as a guest, with that cluster's members "
            "(each cluster stays an independent unit of work). 'auto' = half of sqrt(2 - 2 x threshold) x "
            "the distance between the two centroids, the margin within which one document of every pair "
            "above the threshold must lie (see pipeline/corpus/semantic/prune.py); a number = a fixed margin; "
            "None = compare inside clusters only."
        ),
    )

    @field_validator("boundary_margin")
    @classmethod
    def _margin_range(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float | int) and not 0.0 <= v <= 2.0:
            raise ValueError("boundary_margin: a cosine margin between 0 and 2, 'auto' or null")
        return v


class D4Config(_Strict):
    """D4-style diversification (Tirumala et al. 2023): after SemDeDup, re-cluster and keep per cluster the
    `keep_fraction` of documents farthest from the centroid (the least prototypical)."""

    keep_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="None disables; e.g. 0.8 keeps 80% of each cluster."
    )
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)


class GroupingConfig(_Strict):
    """Similarity packing (In-Context Pretraining, Shi et al. 2024): nearest-neighbour paths in clusters."""

    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)
    neighbors: int = Field(
        default=16, ge=1, le=256, description="Candidate next documents per document on the path."
    )
    rows_per_run: float = Field(
        default=1.0,
        gt=0.0,
        description="Clusters are interleaved in runs of about this many rows of tokens, in proportion to size.",
    )


class DiversityConfig(_Strict):
    embedder: str | None = Field(
        default=None,
        description=(
            "None disables the stage. 'minilm' = the bundled all-MiniLM-L6-v2 (384-d); 'static-minilm' = a "
            "static model distilled once from it (256-d, ~100x faster; cached under ~/.cache/longloom/models); "
            "'static-tokens' = a 256-d table over the pipeline tokenizer's own ids, distilled once per tokenizer "
            "from the same MiniLM: documents are embedded from their stored token ids without decoding (the "
            "fastest); 'st:<path or hub id>' = any sentence-transformers model; 'model2vec:<path or hub id>' = a "
            "model2vec static model."
        ),
    )
    device: str = Field(default="cpu", description="torch device for the embedder.")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Chunks per model call; None = 64, or 512 for static models.",
    )
    chunk_tokens: int | None = Field(
        default=None,
        ge=16,
        description=(
            "Pipeline-tokenizer tokens per embedded chunk; None = 3/4 of the model's max sequence length "
            "(192 for MiniLM), 512 for static models."
        ),
    )
    max_chunks: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Chunks per document, evenly spread; their mean is the embedding.",
    )
    dtype: Literal["float16", "float32"] = "float16"
    cache_dir: str | None = Field(
        default=None,
        description="Embedding cache; None = $LONGLOOM_CACHE_DIR/embeddings or ~/.cache/longloom/embeddings.",
    )
    progress: bool = Field(default=True, description="Show a tqdm progress bar while embedding.")
    seed: int = Field(default=0, description="Seed of k-means sampling and initialisation.")
    semdedup: SemDedupConfig = Field(default_factory=SemDedupConfig)
    d4: D4Config = Field(default_factory=D4Config)
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v in EMBEDDER_NAMES or (v.startswith(EMBEDDER_PREFIXES) and v.split(":", 1)[1]):
            return v
        raise ValueError(
            f"embedder {v!r}: expected one of {', '.join(map(repr, EMBEDDER_NAMES))}, "
            "'st:<sentence-transformers path or hub id>' or 'model2vec:<path or hub id>'"
        )
