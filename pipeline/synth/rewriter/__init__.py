"""LLM rewriter (issue 5): long-range-dependency chat samples through any OpenAI-compatible endpoint.

Modules, in the order a sample goes through them:
- `plan`: sample ids, seeds, context rows and passage depths; batches of contexts (one task each);
- `contexts`: packed rows read back as haystacks (`pipeline.synth.chat.Haystack`), passages cut from them;
- `templates` + `templates/*.txt`: versioned prompt templates;
- `strategies`: chunk_qa, multi_hop, session_state, rephrase: request building and answer -> draft;
- `client` + `cache` + `secrets`: async requests with retries, budget, response cache, cost accounting;
- `parsing` + `evidence` + `assemble`: tolerant JSON, quote finding, token-exact sample, validation;
- `stage`: `run_batch`, `merge`, `run_rewriter`, `check_rewriter` (what `pipeline.build` and the flow call).
"""
