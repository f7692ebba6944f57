"""Synthesized long-range samples: chat assembly (templates, token-exact contexts), procedural
generators (HashHop, RULER-style tasks) and the LLM rewriter.
"""
