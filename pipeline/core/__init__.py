"""The floor everything stands on: tokenizer, packing, Parquet I/O, the work folder, lineage, the
stages' result records, progress, faults.

Nothing here knows about stages or the run's order; every other room of `pipeline/` may import it.
"""
