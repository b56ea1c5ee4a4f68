"""The run directory: every artifact of an experiment, on a local disk or any pyarrow filesystem.

What lives where is `w2sr.layout`'s to say; this module is how it is stored. Files are written to
a temporary name and renamed (on S3, uploaded whole to their key), so a reader sees a whole file
or none, and a stage that finds its done record with the same fingerprint has nothing left to do.
A stage driver works in its folder inside `RunDir.stage`: claimed, its cost recorded as it goes,
and marked done at the end.
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from w2sr.strict import ConfigError, first_line

DONE = "_DONE.json"  # a finished stage's record: its fingerprint and counts
RUN = "_RUN.json"  # the fingerprint of the config a stage's unfinished work belongs to
METRICS = "metrics.jsonl"  # a training stage's per-step records
LEASE = "_LEASE.json"  # who is working on a stage now, and when they last said so
LEASE_TTL_S = 60.0
LEASE_SETTLE_S = 0.5
LEASE_POLL_S = 1.0  # how often a claimant that waits for a held folder looks again

log = logging.getLogger(__name__)


@contextlib.contextmanager
def first_writes(uri: str) -> Iterator[None]:
    """Around a command's first writes into its run dir, before any work: a run dir that cannot
    be written (no such bucket, no credentials, no permission, a file in its way) is one line
    naming `run_dir`, not a traceback from deep in a stage."""
    try:
        yield
    except OSError as error:
        raise ConfigError(
            f"run_dir: {uri} cannot be written: {first_line(error)}; check the path and that this "
            "machine may write there (for an object store: the bucket, AWS_ENDPOINT_URL, and "
            "credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the machine's role)"
        ) from error


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
        """Call `write(fs, path)` to fill a temporary file, then publish it whole at `parts`.

        S3 would move the file with a CopyObject, which it refuses over 5 GiB: there the file is
        made on local disk and uploaded to its key, an upload S3 shows only once complete (a
        crash leaves no object, an error in `write` nothing at all)."""
        self._check_lease(parts)
        final = self.path(*parts)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.S3FileSystem):
            with tempfile.TemporaryDirectory(prefix="w2sr-upload-") as local:
                staged = os.path.join(local, "file")
                write(pafs.LocalFileSystem(), staged)
                pafs.copy_files(
                    staged,
                    final,
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=self.fs,
                )
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(self.fs, tmp)
            self.fs.move(tmp, final)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def write_parquet(self, table: pa.Table, *parts: str) -> None:
        self._atomic(parts, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))

    def write_parquet_stream(self, tables: Iterable[pa.Table], schema: pa.Schema, *parts: str):
        """One file from tables made one after another, so that its writer never holds them all.
        An error raised while the tables are made leaves no file."""

        def write(fs: pafs.FileSystem, tmp: str) -> None:
            with pq.ParquetWriter(tmp, schema, filesystem=fs) as writer:
                for table in tables:
                    writer.write_table(table)

        self._atomic(parts, write)

    def read_parquet(
        self, *parts: str, columns: Sequence[str] | None = None, filters=None
    ) -> pa.Table:
        return pq.read_table(
            self.path(*parts), columns=columns, filters=filters, filesystem=self.fs
        )

    def iter_parquet(
        self, *parts: str, columns: Sequence[str] | None = None, batch_size: int = 1024
    ) -> Iterator[pa.RecordBatch]:
        """A Parquet file's rows, batch by batch: a reader holds one row group at a time."""
        with self.fs.open_input_file(self.path(*parts)) as source:
            yield from pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=columns)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        def write(fs: pafs.FileSystem, tmp: str) -> None:
            with fs.open_output_stream(tmp) as out:
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
        self._check_lease(parts)
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
        there each of its files is uploaded to `parts` (an upload, not a copy on the store, which
        S3 refuses over 5 GiB). Either way a reader trusts the folder only once the stage's done
        record, written after, names it: a publication cut short is redone by the next attempt
        and hides nothing finished, because a stage folder belongs to one fingerprint."""
        self._check_lease(parts)
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

    @contextlib.contextmanager
    def stage(self, artifact: Artifact, wait: bool = False) -> Iterator[Claim]:
        """Work on a stage folder for the block: claimed (a lease), its cost recorded through the
        claim as it goes, and marked done with `claim.facts` when the block ends.

        When the folder is complete for this fingerprint, also because another submission finished
        it while this one claimed or waited, nothing is claimed and `claim.record` holds the done
        record: the block returns it. An error in the block writes no done record; `_RUN.json`
        keeps what the attempt spent, for the next one to count. The lease is released either way.
        `LeaseHeld` when another live submission holds the folder; with `wait`, for an input that
        several stages prepare at once (the problem and prompt sets), wait for it instead."""
        folder, fingerprint = artifact.folder, artifact.fingerprint
        claim = Claim(self, folder, fingerprint)
        record = self._claim_unless_done(folder, fingerprint, wait)
        if record is not None:
            claim.record = record
            yield claim
            return
        try:
            claim.prior_seconds = self._resume(folder, fingerprint)
            yield claim
            self.mark_done(folder, fingerprint, **claim.facts)
            claim.record = self.read_json(folder, DONE)
        finally:
            self._release(folder)

    def _claim_unless_done(
        self, folder: str, fingerprint: str, wait: bool
    ) -> dict[str, Any] | None:
        """Claim `folder` and return None, or return its done record if it is complete."""
        while (record := self.done(folder, fingerprint)) is None:
            try:
                self._claim(folder)
            except LeaseHeld:
                if not wait:
                    raise
                time.sleep(LEASE_POLL_S)  # until the holder is done, fails or lapses
                continue
            record = self.done(folder, fingerprint)  # another submission's, finished meanwhile
            if record is None:
                return None
            self._release(folder)
        return record

    def begin(self, stage: str, fingerprint: str) -> float:
        """Claim `stage` for this process (a lease, until `mark_done`); returns the worker-seconds
        that earlier attempts at it spent, killed ones too. Drivers use `stage`, which does this
        and more."""
        self._claim(stage)
        return self._resume(stage, fingerprint)

    def _resume(self, stage: str, fingerprint: str) -> float:
        """The worker-seconds earlier attempts at a claimed stage spent. A stage folder holds the
        work of one fingerprint only (`w2sr.lineage`), so what an earlier attempt left is ours to
        resume."""
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
        """Hold `stage` for this process until released (`mark_done`, the end of `stage`): a second
        submission on the same run dir (a retried RayJob, a job submitted twice) stops with a
        clear message instead of interleaving its shards and checkpoints with ours. The lease is
        renewed every third of `ttl_s`; one whose owner stops renewing (killed) lapses `ttl_s`
        later, or at once when the owner was a process of this machine that is gone. An owner
        that could not renew it for `ttl_s`, or finds it taken, stops at its next write into the
        folder (`LeaseLost`)."""
        held = self.lease(stage)
        if held:
            age = time.time() - held["heartbeat"]
            raise LeaseHeld(
                f"{self.path(stage)} is being worked on by {held['owner']} (renewed {age:.0f}s "
                f"ago); its lease lapses {held['ttl_s']:.0f}s after its last renewal"
            )
        key = (self.uri, stage)
        if key in _RENEWING:  # this process's own earlier claim, of an attempt that failed
            _RENEWING.pop(key).end()
        lease = _Lease(self, stage, ttl_s)
        lease.write()
        # Object stores have no create-if-absent: of two that wrote at once, the later stands.
        time.sleep(LEASE_SETTLE_S)
        if (self._lease_record(stage) or {}).get("owner") != lease.owner:
            raise LeaseHeld(f"{self.path(stage)} was claimed by another submission just now")
        _RENEWING[key] = lease
        lease.thread.start()

    def _release(self, stage: str) -> None:
        """Stop renewing, then delete the lease if it is still ours: once lost, it is not."""
        lease = _RENEWING.pop((self.uri, stage), None)
        if lease is not None:
            lease.end()
            if (self._lease_record(stage) or {}).get("owner") == lease.owner:
                self.fs.delete_file(self.path(stage, LEASE))

    @contextlib.contextmanager
    def leased(self, folders: Iterable[str]):
        """Hold the lease of each folder for the block, for work with no done record of its
        own: `LeaseHeld` when another live submission holds one."""
        held: list[str] = []
        try:
            for folder in folders:
                self._claim(folder)
                held.append(folder)
            yield
        finally:
            for folder in held:
                self._release(folder)

    def lease(self, stage: str) -> dict[str, Any] | None:
        """The live lease on `stage` (owner, since, heartbeat, ttl_s), or None."""
        held = self._lease_record(stage)
        return held if held and not lapsed(held) else None

    def _lease_record(self, stage: str) -> dict[str, Any] | None:
        return self.read_json(stage, LEASE) if self.exists(stage, LEASE) else None

    def _check_lease(self, parts: tuple[str, ...]) -> None:
        """Raise `LeaseLost` for a write into a stage folder whose lease this process lost."""
        path = "/".join(parts)
        for (uri, stage), lease in list(_RENEWING.items()):
            if uri == self.uri and path.startswith(f"{stage}/"):
                lease.check()

    def done(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's completion record if it finished with this fingerprint, else None."""
        if not self.exists(stage, DONE):
            return None
        record = self.read_json(stage, DONE)
        return record if record.get("fingerprint") == fingerprint else None

    def mark_done(self, stage: str, fingerprint: str, **facts: Any) -> None:
        self.write_json({"fingerprint": fingerprint, **facts}, stage, DONE)
        self._release(stage)


class Artifact(Protocol):
    """A stage folder and the fingerprint of the work it holds (`w2sr.lineage.Artifact`)."""

    @property
    def folder(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...


@dataclass
class Claim:
    """A driver's hold on its stage folder, for the block of `RunDir.stage`."""

    run: RunDir
    folder: str
    fingerprint: str
    record: dict[str, Any] = field(default_factory=dict)  # the done record, once there is one
    prior_seconds: float = 0.0  # what earlier attempts spent, killed ones too
    facts: dict[str, Any] = field(default_factory=dict)  # the done record's, for the driver to set

    def spent(self, worker_seconds: float) -> None:
        """Record what the stage has cost so far (every attempt's), so that a killed attempt's
        work is still counted."""
        self.run.spent(self.folder, self.fingerprint, worker_seconds)


class _Lease:
    """This process's hold on a stage folder, renewed by a thread of its own until `end`."""

    def __init__(self, run: RunDir, stage: str, ttl_s: float):
        self.run, self.stage, self.ttl_s = run, stage, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.since = time.time()  # when this owner took the stage
        self.renewed = 0.0  # the heartbeat of the last record written
        self.lost: str | None = None  # why the lease is no longer ours
        self.failure: BaseException | None = None  # the last renewal's error, if it failed
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._keep, daemon=True, name=f"w2sr-lease-{stage}")

    def write(self) -> None:
        heartbeat = time.time()
        record = {"owner": self.owner, "since": self.since, "heartbeat": heartbeat}
        record["ttl_s"] = self.ttl_s
        self.run.write_json(record, self.stage, LEASE)
        self.renewed = heartbeat

    def check(self) -> None:
        """Raise `LeaseLost` once the lease is not ours: taken, or not renewed for `ttl_s`, after
        which another submission may have judged it lapsed and taken the stage."""
        since = time.time() - self.renewed
        if self.lost is None and since > self.ttl_s:
            failure = f"; last error: {self.failure!r}" if self.failure else ""
            self.lost = f"not renewed for {since:.1f}s, longer than its {self.ttl_s:g}s{failure}"
        if self.lost is not None:
            raise LeaseLost(
                f"{self.run.path(self.stage)}: this process lost its lease on the stage "
                f"({self.lost}); the stage stops so as not to write over whoever holds it now"
            )

    def renew(self) -> None:
        self.check()
        held = self.run._lease_record(self.stage)
        if held is not None and held["owner"] != self.owner:
            self.lost = f"{held['owner']} holds it now"
            self.check()
        self.write()

    def _keep(self) -> None:
        """Renew every third of the ttl; a renewal that fails (the store out of reach) is tried
        again after a short backoff, until the lease is renewed or known lost."""
        every, failures = self.ttl_s / 3, 0
        while not self.ended.wait(min(every, every * 2**failures / 16) if failures else every):
            try:
                self.renew()
                failures, self.failure = 0, None
            except LeaseLost as error:
                log.error("%s", error)
                return
            except Exception as error:
                failures, self.failure = failures + 1, error
                log.warning("%s: lease renewal failed (%r); retrying", self.stage, error)

    def end(self) -> None:
        """Stop renewing, and wait for a renewal under way, so it cannot rewrite a deleted lease."""
        self.ended.set()
        if self.thread.is_alive():
            self.thread.join()


# This process's leases by (run dir, stage).
_RENEWING: dict[tuple[str, str], _Lease] = {}


class LeaseHeld(RuntimeError):
    """Another live submission is working on the stage."""


class LeaseLost(RuntimeError):
    """This process no longer holds the lease of a stage it works on."""


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
        self.lines: list[str] = []
        self.flush_seconds, self.flushed = flush_seconds, time.time()
        if self.local:
            os.makedirs(os.path.dirname(run.path(*self.parts)), exist_ok=True)
            self._cut_torn_line()
        elif run.exists(*self.parts):
            text = run.read_text(*self.parts)
            whole = text[: text.rfind("\n") + 1]
            if whole != text:
                log.warning("%s: dropped a torn last line", run.path(*self.parts))
            self.lines = whole.splitlines(keepends=True)

    def _cut_torn_line(self) -> None:
        """A crash mid-append can leave a last line without its newline: appended to, it would
        become one line of two records, which no reader of the log can parse."""
        path = self.run.path(*self.parts)
        if not os.path.exists(path):
            return
        with open(path, "rb+") as log_file:
            data = log_file.read()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                log_file.truncate(whole)
                log.warning("%s: cut a torn last line (%d bytes)", path, len(data) - whole)

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


def last_record(run: RunDir, stage: str) -> dict[str, Any]:
    """A training stage's latest per-step record ({} before its first): read from the end of its
    metrics file, so that following a long run costs one small read."""
    if not run.exists(stage, METRICS):
        return {}
    with run.fs.open_input_file(run.path(stage, METRICS)) as metrics:
        size = metrics.size()
        metrics.seek(max(0, size - 8192))
        lines = metrics.read().decode(errors="replace").splitlines()
    for line in reversed(lines[1 if size > 8192 else 0 :]):  # a seek may cut the first
        with contextlib.suppress(ValueError):  # a torn last line
            return json.loads(line)
    return {}
