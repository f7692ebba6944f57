"""The build's stages, one module each, in the order they run: prepare, embed, select, write,
procedural, rewriter, finalize, publish. `pipeline/build.py` runs them in this process.
"""
