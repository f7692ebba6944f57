"""Where a run keeps its intermediate files, keyed so a changed config never reuses stale work."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.storage import StoreLock, fetch_all, is_remote, output_path
from schemas.config import PREPARE_SECTIONS, ROW_SECTIONS, BuildConfig, config_hash, section_hash

CONFIG_HASH_FILE = "config-hash"  # under .longloom/: the config hash of the run that holds the folder


def folder_key(cfg: BuildConfig, sections: Iterable[str]) -> str:
    """The key of a stage's work: the hash of the config sections its output depends on (its own and,
    transitively, its inputs') and the run-level seed. `Stage.key` is this hash, and the stage's work
    folder is named by it, so verified work is reused exactly when the stage's key matches."""
    return section_hash(cfg, *sorted({*sections, "run"}))  # `run` hashes the seed only (execution-only rest)


class WorkDir:
    """Paths of one run. Stage folders carry a hash of the config sections that stage depends on."""

    def __init__(self, cfg: BuildConfig) -> None:
        # a URL output is worked on through this process's mirror of it (pipeline.core.storage)
        self.dir = cfg.output.dir
        self.out = output_path(cfg.output.dir)
        self.root = self.out / ".longloom"
        self.config_hash = config_hash(cfg)
        # how intermediate Parquet under .longloom/ is compressed: how its files are written, never
        # what they hold, so no stage key depends on it (output files use their stage's own setting)
        self.compression_level = cfg.output.compression_level
        # The keys of the stages' folders (tests/test_stage_keys.py holds them equal to `Stage.key`).
        # Reading, tokenizing and per-document filtering depend on these sections only, so a new
        # packing config reuses the tokenized documents.
        self.prepare_key = folder_key(cfg, PREPARE_SECTIONS)
        # What each kind of output row depends on (schemas.config.ROW_SECTIONS): selection and the
        # pretraining shards never depend on the procedural or rewriter settings.
        self.row_keys = {kind: folder_key(cfg, sections) for kind, sections in ROW_SECTIONS.items()}

    @property
    def prepare_dir(self) -> Path:
        return self.root / f"prepare-{self.prepare_key}"

    def prepare_record(self, shard_id: str) -> Path:
        return self.prepare_dir / "done" / f"{shard_id}.json"

    @property
    def select_dir(self) -> Path:
        return self.root / f"select-{self.row_keys['pretraining']}"

    @property
    def procedural_dir(self) -> Path:
        return self.root / f"procedural-{self.row_keys['procedural']}"

    @property
    def rewriter_dir(self) -> Path:
        return self.root / f"rewriter-{self.row_keys['rewriter']}"

    def written_record(self, config_name: str, shard: int) -> Path:
        return self.select_dir / "written" / f"{config_name}-{shard:05d}.json"

    def data_dir(self, config_name: str) -> Path:
        return self.out / "data" / config_name

    @property
    def audit_dir(self) -> Path:
        return self.out / "audit"

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], Any] = print) -> Iterator[None]:
        """Hold the output folder for one run; a second run on it waits (e.g. overlapping schedules).

        An flock dies with its process, so a run killed by SIGKILL never leaves the folder locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        held: StoreLock | None = None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{self.out}: another run holds this output folder; waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if is_remote(self.dir):
                # the flock keeps out runs on this machine; clients on other machines meet at the store
                held = StoreLock(self.dir)
                held.acquire(log)
            # which config this folder's run is of, before any output exists (see build.check_unnamed_output)
            (self.root / CONFIG_HASH_FILE).write_text(self.config_hash + "\n", encoding="utf-8")
            # the process that holds the run merges the stages' results: it mirrors a store's folder
            # whole (a process that only runs units fetches what each unit names)
            fetch_all(self.dir)
            yield
        finally:
            if held is not None:
                held.release()
            os.close(fd)  # releases the lock

    def remove_temporaries(self) -> int:
        """Delete `.tmp-*` files a killed run left behind (call while holding the lock, before work)."""
        n = 0
        if self.out.is_dir():
            for p in self.out.rglob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n
