"""The step loop SFT and GRPO share inside their Ray Train workers.

It owns what does not depend on the objective: resuming from the latest checkpoint, the step
count and worker-seconds, the per-step record (metrics file, stdout, trackers), the checkpoint
cadence and the export of the trained model. Each stage supplies its step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from w2sr import layout
from w2sr.config import LearnerConfig
from w2sr.learner.checkpoint import restore, save_checkpoint
from w2sr.learner.export import export_hf
from w2sr.learner.fit import Worker
from w2sr.rundir import RUN, MetricsLog, RunDir
from w2sr.tracking import Trackers

log = logging.getLogger(__name__)

# One step: (step index, the loop's state) -> (the step's metrics, state fields it advances).
Step = Callable[[int, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


class StepLoop:
    """Runs a learner from its latest checkpoint (or `start`) to `steps`.

    `workers` is how many processes the run bills per second: the learner's workers, plus
    rollout engines that hold resources of their own.
    """

    def __init__(
        self,
        worker: Worker,
        engine,
        learner: LearnerConfig,
        *,
        run_name: str,
        stage: str,
        steps: int,
        workers: int,
        start: dict[str, Any],
    ):
        self.worker, self.engine, self.learner = worker, engine, learner
        self.stage, self.steps, self.workers = stage, steps, workers
        fresh = {**start, "step": 0, "worker_seconds": 0.0}
        restored = restore(engine)  # DeepSpeed's client state, with metadata of its own
        self.state = {key: restored[key] for key in fresh} if restored else fresh
        self.resumed_from = self.state["step"]
        self.run_dir = RunDir(worker.cfg.run_dir)
        # Every earlier attempt's cost, the steps a killed one took after its last checkpoint too.
        self.claim = self.run_dir.read_json(stage, RUN)
        self.prior_seconds = self.claim["worker_seconds"]
        rank0 = worker.rank == 0
        self.metrics_log = MetricsLog(self.run_dir, stage) if rank0 else None
        self.trackers = Trackers(learner, run_name, learner.model_dump(mode="json"))
        if self.resumed_from and rank0:
            log.info("resumed at step %d", self.resumed_from)

    def run(
        self, step: Step, describe: Callable[[dict[str, Any]], str], tracked: tuple[str, ...]
    ) -> None:
        """Take every remaining step; rank 0 logs `describe(record)` and sends the `tracked`
        metrics to the trackers."""
        for index in range(self.state["step"], self.steps):
            if index + 1 == self.learner.profile_step:
                metrics, advanced = self._profiled(step, index)
            else:
                metrics, advanced = step(index, self.state)
            now = time.time()
            self.state = {
                **self.state,
                **advanced,
                "step": index + 1,
                "worker_seconds": self.prior_seconds + self.workers * (now - self.worker.started),
            }
            record = {
                "step": index + 1,
                "total_steps": self.steps,
                **metrics,
                "worker_seconds": self.state["worker_seconds"],  # the stage's cost so far
                "time": now,
                "resumed_from": self.resumed_from,
            }
            if self.metrics_log:
                self.run_dir.spent(
                    self.stage, self.claim["fingerprint"], self.state["worker_seconds"]
                )
                self.metrics_log.write(record)
                log.info("%s", describe(record))
                found = {k: record[k] for k in tracked if record.get(k) is not None}
                self.trackers.log(found, index + 1)
            if self.state["step"] % self.learner.checkpoint_every == 0 or index + 1 == self.steps:
                if self.metrics_log:
                    self.metrics_log.flush()
                save_checkpoint(self.engine, self.state, record)

    def _profiled(self, step: Step, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One step under torch's profiler; rank 0 writes its report in the stage folder."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        gpu = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            result = step(index, self.state)
        wall = time.perf_counter() - start
        if self.worker.rank == 0:
            what = f"step {index + 1} of {self.stage}, rank 0"
            report = profile_report(prof, wall, what, by_device=gpu)
            self.run_dir.write_text(report, self.stage, layout.step_profile(index + 1))
        return result

    def finish(self, end_text: str) -> None:
        """Close the trackers and export the model (collective; rank 0 writes `<stage>/model`)."""
        self.trackers.close()
        tokenizer = self.worker.tokenizer
        if self.worker.rank == 0:
            with self.run_dir.staged_folder(self.stage, layout.MODEL) as out:
                export_hf(self.engine, tokenizer, out, end_text)
        else:
            export_hf(self.engine, tokenizer, None, end_text)


def profile_report(prof, wall: float, what: str, by_device: bool = False) -> str:
    """A profiled step's operators by their own time, below the step's wall-clock and how much
    of it the operators account for (the rest is Python and waits on other processes)."""
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    head = f"{what}: {wall:.3f} s wall-clock, {in_ops:.3f} s of it in torch operators on the CPU\n"
    order = "self_device_time_total" if by_device else "self_cpu_time_total"
    return head + events.table(sort_by=order, row_limit=30)
