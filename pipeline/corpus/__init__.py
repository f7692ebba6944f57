"""What is known about the input documents once prepared: the document index, drops with reasons,
filters, exact dedup and source budgets; `semantic/` adds embedding-based selection on top.
"""
