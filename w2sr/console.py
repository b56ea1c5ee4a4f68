"""What a command shows: its own lines on the console, everything else in the stage's log file.

Ray forwards every worker's output (vLLM's engines, Ray Train's workers, Ray Data's operators) to
the driver's stdout and stderr, and libraries log and warn there: a successful `w2sr run` would
print thousands of lines, among them tracebacks of engines shutting down as they should. Unless
`-v`, a command points its file descriptors 1 and 2 (and so its own logging, what Ray forwards
and what C extensions write) at a log file per stage in the run dir, `logs/<stage>.log` (for a
run dir in object storage, a local file copied there whenever its stage ends), and keeps the
console for a line at each stage's start and end, a progress bar of its work (`progress`), w2sr's
warnings and errors, the result, and for a stage that fails its error, its log file and the log's
last lines. The descriptors stay on the last stage's log until the command ends, so that what Ray
prints while it shuts down lands there too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow.fs as pafs
from tqdm import tqdm

from w2sr import layout
from w2sr.rundir import RunDir
from w2sr.strict import first_line

TAIL_LINES = 15  # of a failed stage's log, shown on the console
_open: Console | None = None  # the quiet console of the command this process runs


class StageFailed(RuntimeError):
    """A stage failed; the console has its error, its log file and the log's end."""


class Console:
    """The command's terminal, kept apart from the stages' log files."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.out: IO[str] = sys.stdout
        self.err: IO[str] = sys.stderr
        self._saved: tuple[int, int] | None = None  # the descriptors 1 and 2 had at the start
        self._log: Path | None = None  # the stage log the descriptors point at
        self._upload: tuple[RunDir, tuple[str, ...]] | None = None  # where a local copy goes
        self._handler: logging.Handler | None = None
        self._ray_was_up = False
        self._stage: str | None = None  # the stage running now, which names its progress bars
        self._copies: list[IO[str]] = []  # the streams `open` made, closed by `close`

    def open(self) -> None:
        global _open
        if self.verbose:
            return
        _open = self
        self.out, self.err = _lasting(sys.stdout, 1), _lasting(sys.stderr, 2)
        self._copies = [s for s in (self.out, self.err) if s not in (sys.stdout, sys.stderr)]
        self._handler = logging.StreamHandler(self.err)
        self._handler.setLevel(logging.WARNING)
        self._handler.addFilter(lambda record: record.name.split(".")[0] == "w2sr")
        self._handler.setFormatter(logging.Formatter("w2sr: %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        ray = sys.modules.get("ray")
        self._ray_was_up = bool(ray and ray.is_initialized())

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    @contextlib.contextmanager
    def stage(self, run: RunDir, name: str, log_name: str) -> Iterator[None]:
        """The block's output into `logs/<log_name>.log`; a line when stage `name` starts and when
        it ends, and for a failure other than a known one (a config error, a lease held
        elsewhere: their one line is the caller's), its error and the log's end, then
        `StageFailed`."""
        if self.verbose:
            yield
            return
        shown = self._point_at(run, log_name)
        self.say(f"{name}: started (log: {shown})")
        start = time.time()
        self._stage = name
        try:
            yield
        except Exception as error:
            assert self._log is not None
            with self._log.open("a") as log:
                log.write(traceback.format_exc())
            self._copy_out()
            if _known(error):
                raise
            took = time.time() - start
            lines = self._log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            cause = getattr(error, "cause", None) or error  # a Ray task's: what it raised
            self.say(
                f"{name}: failed after {took:.0f} s: {type(cause).__name__}: {first_line(cause)}"
            )
            self.say(f"  log: {shown}; its last lines:")
            for line in lines:
                self.say(f"  | {line}")
            raise StageFailed(name) from error
        finally:
            self._stage = None
        self._copy_out()
        self.say(f"{name}: done in {time.time() - start:.0f} s")

    def close(self) -> None:
        """Shut down a Ray session this command started (its output still goes to the log), then
        give the descriptors back; the console is the process's streams again."""
        global _open
        if self.verbose:
            return
        _open = None
        if self._saved is not None:
            ray = sys.modules.get("ray")
            if ray and ray.is_initialized() and not self._ray_was_up:
                ray.shutdown()
            flush_streams()
            for fd, saved in zip((1, 2), self._saved, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            self._saved = None
            self._copy_out()
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        for stream in (self.out, self.err):
            stream.flush()
        for copy in self._copies:  # the originals are back
            copy.close()
        self._copies = []
        self.out, self.err = sys.stdout, sys.stderr

    def _point_at(self, run: RunDir, name: str) -> str:
        """Descriptors 1 and 2 to the stage's log file (appended: a rerun adds its attempt);
        returns where a person finds it."""
        parts = layout.stage_log(name)
        if isinstance(run.fs, pafs.LocalFileSystem):
            path = Path(run.path(*parts))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._upload = None
        else:
            path = Path(tempfile.mkdtemp(prefix="w2sr-log-")) / parts[1]
            if run.exists(*parts):  # the earlier attempts', kept above this one
                path.write_bytes(run.read_bytes(*parts))
            self._upload = (run, parts)
        with path.open("a") as log:
            log.write(f"\n=== w2sr {name}: {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        flush_streams()
        if self._saved is None:
            self._saved = (os.dup(1), os.dup(2))
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        self._log = path
        return run.location(*parts) if self._upload else str(path)

    def _copy_out(self) -> None:
        """The stage log, copied into an object-store run dir as it is now."""
        flush_streams()
        if self._upload and self._log is not None:
            run, parts = self._upload
            run.write_bytes(self._log.read_bytes(), *parts)


@contextlib.contextmanager
def progress(total: int, unit: str, what: str = "", initial: int = 0) -> Iterator[tqdm]:
    """A bar for the running stage's work (tqdm's, with its rate and time left): redrawn in place
    on a terminal; where the console is a file (a job's log, a sweep's stage log), its last state
    as one line when the work ends. Outside a quiet command (`-v`, a stage called from Python)
    it shows nothing: the stage's log lines and Ray Data's own bars say how far it is."""
    console = _open
    if console is None or console._stage is None:
        with tqdm(total=total, initial=initial, disable=True) as bar:
            yield bar
        return
    live = console.err.isatty()
    bar = tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=f"{console._stage}: {what}" if what else console._stage,
        file=console.err if live else io.StringIO(),
        mininterval=0.5,
        dynamic_ncols=live,
        smoothing=0.1 if live else 0,  # the line a file gets: the average rate
    )
    with bar:
        yield bar
        if not live:  # its work done; a failure says more than where the bar stopped
            console.say(str(bar))


def _known(error: BaseException) -> bool:
    """A failure whose one line says what to do (`w2sr.cli` prints it)."""
    from w2sr.config import ConfigError
    from w2sr.rundir import LeaseHeld, LeaseLost

    return isinstance(error, (ConfigError, LeaseHeld, LeaseLost))


def _lasting(stream: Any, fd: int) -> IO[str]:
    """A stream that still reaches the terminal once `fd` points at a log file: a copy of the
    descriptor for a stream written through it, else the stream itself (a test's capture)."""
    try:
        if stream.fileno() == fd:
            encoding = getattr(stream, "encoding", None) or "utf-8"
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding=encoding, errors="replace")
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return stream


def flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
