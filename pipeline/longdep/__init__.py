"""Long-range dependency scoring (issue 15): does a document's far context improve a causal LM's predictions?

- `backends`: the model interface (`LogprobModel`) and its implementations (transformers, an
  OpenAI-compatible completions endpoint, the offline Gemma 3 270M).
- `scorer`: `long_dependency@2`, span sampling, the long-versus-short gain, the distance profile and
  the verbatim-copy correction.
- `cache`: scores cached by (model fingerprint, document hash, settings), resumable.
- `use`: the scores in selection (per-source filters, `longest_first` routing), row scores, and the
  manifest's `extra["long_dependency"]`. The stage itself is `pipeline.stages.long_dependency`.
"""
