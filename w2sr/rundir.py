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
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DONE = "_DONE.json"  # a finished stage's record: its fingerprint and counts
RUN = "_RUN.json"  # the fingerprint of the config a stage's unfinished work belongs to
METRICS = "metrics.jsonl"  # a training stage's per-step records
LEASE = "_LEASE.json"  # who is working on a stage now, and when they last said so
LEASE_TTL_S = 60.0
LEASE_SETTLE_S = 0.5

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, uri: str, create: bool = True):
        """`create=False` for what only reads (planning): a run dir that does not exist yet
        stays so, and reads as empty."""
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri = uri
        if create:
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

    def write_parquet_stream(self, tables: Iterable[pa.Table], schema: pa.Schema, *parts: str):
        """One file from tables made one after another, so that its writer never holds them all.
        An error raised while the tables are made leaves no file."""

        def write(tmp: str) -> None:
            with pq.ParquetWriter(tmp, schema, filesystem=self.fs) as writer:
                for table in tables:
                    writer.write_table(table)

        self._atomic(parts, write)

    def read_parquet(self, *parts: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        return pq.read_table(
            self.path(*parts), columns=columns, filters=filters, filesystem=self.fs
        )

    def write_bytes(self, data: bytes, *parts: str) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)

        self._atomic(parts, write)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_text(*parts))

    def size(self, *parts: str) -> int:
        """Bytes in a file, or in every file under a folder."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.File:
            return info.size
        selector = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        found = self.fs.get_file_info(selector)
        return sum(i.size for i in found if i.type == pafs.FileType.File)

    def delete(self, *parts: str) -> None:
        target = self.path(*parts)
        info = self.fs.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(target)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(target)

    @contextlib.contextmanager
    def staged_folder(self, *parts: str):
        """A local folder to write into, published at `parts` when the block ends.

        On a local disk the folder is renamed into place; object stores cannot move a folder, so
        there its files are copied to `parts`. Either way a reader trusts the folder only once
        the stage's done record, written after, names it: a publication cut short is redone by
        the next attempt and hides nothing finished, because a stage folder belongs to one
        fingerprint."""
        final = self.path(*parts)
        if isinstance(self.fs, pafs.LocalFileSystem):
            staged = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            yield staged
            self.delete(*parts)  # an earlier attempt's, cut short before its done record
            self.fs.move(staged, final)
            return
        with tempfile.TemporaryDirectory(prefix="w2sr-export-") as local:
            yield local
            self.delete(*parts)
            self.fs.create_dir(final, recursive=True)
            pafs.copy_files(local, final, destination_filesystem=self.fs)

    # --- stage completion ---

    def begin(self, stage: str, fingerprint: str) -> float:
        """Claim `stage` for this process (a lease, until `mark_done`); returns the worker-seconds
        that earlier attempts at it spent, killed ones too. A stage folder holds the work of one
        fingerprint only (`w2sr.lineage`), so what an earlier attempt left is ours to resume."""
        self._claim(stage)
        record = self.read_json(stage, RUN) if self.exists(stage, RUN) else {}
        if record.get("fingerprint", fingerprint) != fingerprint:
            raise RuntimeError(
                f"{self.path(stage)} holds work of fingerprint {record['fingerprint']}, not "
                f"{fingerprint}: a stage folder must be named by its fingerprint"
            )
        spent = record.get("worker_seconds", 0.0)
        self.spent(stage, fingerprint, spent)
        return spent

    def spent(self, stage: str, fingerprint: str, worker_seconds: float) -> None:
        """Record what the stage has cost so far, so a killed attempt's work is still counted."""
        self.write_json({"fingerprint": fingerprint, "worker_seconds": worker_seconds}, stage, RUN)

    def _claim(self, stage: str, ttl_s: float = LEASE_TTL_S) -> None:
        """Hold `stage` for this process until `mark_done`: a second submission on the same run
        dir (a retried RayJob, a job submitted twice) stops with a clear message instead of
        interleaving its shards and checkpoints with ours. The lease is renewed every third of
        `ttl_s`; one whose owner stops renewing (killed) lapses `ttl_s` later, or at once when
        the owner was a process of this machine that is gone."""
        held = self.read_json(stage, LEASE) if self.exists(stage, LEASE) else None
        if held and not lapsed(held):
            age = time.time() - held["heartbeat"]
            raise LeaseHeld(
                f"{self.path(stage)} is being worked on by {held['owner']} (renewed {age:.0f}s "
                f"ago); its lease lapses {held['ttl_s']:.0f}s after its last renewal"
            )
        key = (self.uri, stage)
        if key in _RENEWING:  # this process's own earlier claim, of an attempt that failed
            _stop(_RENEWING.pop(key))
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

        def renew() -> None:
            record = {"owner": owner, "heartbeat": time.time(), "ttl_s": ttl_s}
            self.write_json(record, stage, LEASE)

        renew()
        # Object stores have no create-if-absent: of two that wrote at once, the later stands.
        time.sleep(LEASE_SETTLE_S)
        if self.read_json(stage, LEASE)["owner"] != owner:
            raise LeaseHeld(f"{self.path(stage)} was claimed by another submission just now")
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(ttl_s / 3):
                renew()

        thread = threading.Thread(target=keep, daemon=True, name=f"w2sr-lease-{stage}")
        _RENEWING[key] = (stop, thread)
        thread.start()

    def _release(self, stage: str) -> None:
        held = _RENEWING.pop((self.uri, stage), None)
        if held is not None:
            _stop(held)
            self.delete(stage, LEASE)

    def done(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's completion record if it finished with this fingerprint, else None."""
        if not self.exists(stage, DONE):
            return None
        record = self.read_json(stage, DONE)
        return record if record.get("fingerprint") == fingerprint else None

    def mark_done(self, stage: str, fingerprint: str, **facts: Any) -> None:
        self.write_json({"fingerprint": fingerprint, **facts}, stage, DONE)
        self._release(stage)


# This process's leases by (run dir, stage): the event that stops the renewals, and their thread.
_RENEWING: dict[tuple[str, str], tuple[threading.Event, threading.Thread]] = {}


def _stop(held: tuple[threading.Event, threading.Thread]) -> None:
    """Stop renewing, and wait for a renewal under way, so it cannot rewrite a deleted lease."""
    stop, thread = held
    stop.set()
    thread.join()


class LeaseHeld(RuntimeError):
    """Another live submission is working on the stage."""


def lapsed(held: dict[str, Any]) -> bool:
    if time.time() - held["heartbeat"] > held["ttl_s"]:
        return True
    host, pid, _ = held["owner"].rsplit(":", 2)
    if host != socket.gethostname():
        return False
    if int(pid) == os.getpid():
        return True  # this process's own, of an attempt that failed
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True  # a process of this machine that is gone (killed) holds nothing
    except PermissionError:
        return False
    return False


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
