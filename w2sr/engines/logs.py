"""What an engine logs that says nothing is wrong, dropped at vLLM's loggers in the engine's own
process: every worker process of a w2sr command runs `install` first (`session.job_env`).

When an engine is shut down as it should be, vLLM's client cleans up its engine core first, and
the task that reads the core's outputs may then fail with `EngineDeadError`: vLLM logs that at
ERROR with its traceback, a failure to read that is none. Once the client has begun its shutdown
(its "[shutdown]" line), that record is dropped; an engine that dies while it works still logs
it, and the stage still fails with the error.
"""

from __future__ import annotations

import logging

CLIENT, ENGINE = "vllm.v1.engine.core_client", "vllm.v1.engine.async_llm"


class ShutDownOnPurpose(logging.Filter):
    """Drops an `EngineDeadError`'s record once the client has said it shuts down."""

    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == CLIENT and record.getMessage().startswith("[shutdown]"):
            self.shutting_down = True
        error = record.exc_info[1] if record.exc_info else None
        dead = type(error).__name__ == "EngineDeadError"
        return not (record.name == ENGINE and dead and self.shutting_down)


def install() -> None:
    """The filter on both loggers (the command's `worker_process_setup_hook`)."""
    quiet = ShutDownOnPurpose()
    for name in (CLIENT, ENGINE):
        logging.getLogger(name).addFilter(quiet)
