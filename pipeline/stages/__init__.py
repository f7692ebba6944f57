"""The build's stages, one module each, in the order they run: prepare, embed, select, write,
procedural, rewriter, finalize, publish. Each module holds its stage's definition (a `Stage`: config
sections, inputs, units) next to its code; `plan.py` orders them (`STAGES`) and is the loop both
executors run (`pipeline/build.py` in this process, `flows/build.py` as Prefect tasks).
"""
