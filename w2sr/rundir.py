"""The run directory: every artifact of an experiment, on a local disk or any pyarrow filesystem.

What lives where is `w2sr.layout`'s to say; this module is how it is stored. Files are written to
a temporary name and renamed, so a reader sees a whole file or none, and a stage that finds its
done record with the same fingerprint has nothing left to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DONE = "_DONE.json"  # a finished stage's record: its fingerprint and counts
RUN = "_RUN.json"  # the fingerprint of the config a stage's unfinished work belongs to
METRICS = "metrics.jsonl"  # a training stage's per-step records

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, uri: str):
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri
        self.fs.create_dir(self.root, recursive=True)

    def path(self, *parts: str) -> str:
        """The path on `self.fs` (a remote store's path has no scheme)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def location(self, *parts: str) -> str:
        """What other processes (Ray workers, vLLM, a report) open: an absolute local path (also
        for a `file://` run dir), or the URI of a remote one."""
        local = isinstance(self.fs, pafs.LocalFileSystem)
        base = self.root if local else self.uri.rstrip("/")
        return "/".join([base.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list(self, *parts: str, suffix: str = "") -> list[str]:
        """Names of the files directly under a folder, sorted; temporary files are not listed."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector)]
        return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)

    def _atomic(self, parts: tuple[str, ...], write) -> None:
        """Call `write(tmp)` to fill a temporary file, then move it to `parts`."""
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(tmp)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def write_parquet(self, table: pa.Table, *parts: str) -> None:
        self._atomic(parts, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def read_parquet(self, *parts: str) -> pa.Table:
        return pq.read_table(self.path(*parts), filesystem=self.fs)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)

        self._atomic(parts, write)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read().decode()

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_text(*parts))

    def delete(self, *parts: str) -> None:
        target = self.path(*parts)
        info = self.fs.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(target)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(target)

    @contextlib.contextmanager
    def staged_folder(self, *parts: str):
        """A local folder to write into, published at `parts` in one move at the end."""
        final = self.path(*parts)
        staged = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            yield staged
        else:
            with tempfile.TemporaryDirectory(prefix="w2sr-export-") as local:
                yield local
                self.fs.create_dir(staged, recursive=True)
                pafs.copy_files(local, staged, destination_filesystem=self.fs)
        self.delete(*parts)
        self.fs.move(staged, final)

    # --- stage completion ---

    def begin(self, stage: str, fingerprint: str) -> float:
        """Claim `stage` for this config; returns the worker-seconds that earlier attempts at it
        spent, killed ones too. Unfinished work of another config (shards, checkpoints,
        metrics) cannot be resumed or mixed in: it is deleted."""
        record = self.read_json(stage, RUN) if self.exists(stage, RUN) else {}
        if record.get("fingerprint", fingerprint) != fingerprint:
            log.warning("the config of %s changed since it was started; starting it afresh", stage)
            self.delete(stage)
            record = {}
        spent = record.get("worker_seconds", 0.0)
        self.spent(stage, fingerprint, spent)
        return spent

    def spent(self, stage: str, fingerprint: str, worker_seconds: float) -> None:
        """Record what the stage has cost so far, so a killed attempt's work is still counted."""
        self.write_json({"fingerprint": fingerprint, "worker_seconds": worker_seconds}, stage, RUN)

    def done(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's completion record if it finished with this fingerprint, else None."""
        if not self.exists(stage, DONE):
            return None
        record = self.read_json(stage, DONE)
        return record if record.get("fingerprint") == fingerprint else None

    def mark_done(self, stage: str, fingerprint: str, **facts: Any) -> None:
        self.write_json({"fingerprint": fingerprint, **facts}, stage, DONE)


class MetricsLog:
    """A stage's per-step records in `<stage>/metrics.jsonl`.

    A local file is appended to line by line; object stores cannot append, so there the file is
    rewritten whole at most every `flush_seconds` and at every `flush`.
    """

    def __init__(self, run: RunDir, stage: str, flush_seconds: float = 10.0):
        self.run, self.parts = run, (stage, METRICS)
        self.local = isinstance(run.fs, pafs.LocalFileSystem)
        self.lines = (
            []
            if self.local or not run.exists(*self.parts)
            else [line + "\n" for line in run.read_text(*self.parts).splitlines()]
        )
        self.flush_seconds, self.flushed = flush_seconds, time.time()
        if self.local:
            os.makedirs(os.path.dirname(run.path(*self.parts)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.local:
            with open(self.run.path(*self.parts), "a") as out:
                out.write(line)
            return
        self.lines.append(line)
        if time.time() - self.flushed > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.local:
            self.run.write_text("".join(self.lines), *self.parts)
            self.flushed = time.time()
