"""The bottom layer: what Longloom's data and settings look like, importing nothing of `pipeline/`.

`config` (the validated build config, with the sections other issues own plugged in from `diversity`,
`synthesis`, `procedural`, `publish`, `longdep`), `stage_config` (which sections each stage may read),
`manifest` (manifest.json and its per-unit records), `records` (the Arrow schema of every table
written) and `redact` (secret-free forms of URLs).
"""
