"""Fault injection for the end-to-end tests: SIGKILL a process this test session started."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def kill_when(
    ready: Callable[[], bool], marker: str | tuple[str, ...], killed: list, timeout: float = 600.0
):
    """A started thread that SIGKILLs every descendant process whose command line holds `marker`
    (Ray sets an actor's title, e.g. `ray::MapWorker(MapBatches(vLLMEngineStageUDF))`) once
    `ready()` is true; what `ready()` said at the kill is appended to `killed`."""

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(0.05)
            state = ready()
            if not state:
                continue
            victims = descendants(marker)
            for process in victims:
                process.kill()
            if victims:
                killed.append(state)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def descendants(marker: str | tuple[str, ...]) -> list:
    """This process's descendants whose command line holds `marker` (or one of them)."""
    import psutil

    markers = (marker,) if isinstance(marker, str) else marker
    processes = psutil.Process().children(recursive=True)
    return [p for p in processes if any(m in _cmdline(p) for m in markers)]


def _cmdline(process) -> str:
    try:
        return " ".join(process.cmdline())
    except Exception:  # gone meanwhile
        return ""
