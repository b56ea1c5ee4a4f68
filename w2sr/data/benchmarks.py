"""The standard benchmarks by name: where each lives on the hub and how its columns read.

A registry only: loading and validating their rows is `w2sr.data.sources`' work.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from w2sr.grading import extract_answer

# --- GSM8K ships worked solutions (MATH too: its answer is grading.extract_answer) ----------


def _after_hashes(solution: str) -> str | None:
    """GSM8K: the gold answer follows `#### `; thousands separators are dropped (1,234 -> 1234)."""
    _, sep, tail = solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    return answer if sep and answer else None


# --- benchmarks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Where a copy of a benchmark keeps the problem, the gold answer and the id.

    `extract` reads the final answer out of the answer column when that column is a worked
    solution (MATH's last `\\boxed{}`, GSM8K's `#### N`).
    """

    problem: str
    answer: str
    id: str | None = None
    extract: Callable[[str], str | None] | None = None


@dataclass(frozen=True)
class Benchmark:
    """A standard set: its hub id and default split, and its own column names."""

    hub: str
    split: str
    problem: str
    answer: str
    id: str | None = None
    config: str | None = None
    level: str | None = None
    extract: Callable[[str], str | None] | None = None
    # Reshapes a raw row before validation (a row it cannot read goes on unchanged, to be rejected).
    prepare: Callable[[dict], dict] | None = None
    # The columns of the copy SimpleRL-Zoo's evaluator ships (examples/simplelr_math_eval/data/),
    # where they differ from the hub's: read when a copy's rows lack the hub's problem column.
    local: Columns | None = None

    @property
    def columns(self) -> Columns:
        """The hub copy's columns."""
        return Columns(self.problem, self.answer, self.id, self.extract)


def _olympiad_answer(row: dict) -> dict:
    """OlympiadBench: `final_answer` is a list of LaTeX strings in `$...$`; several answers (a
    multi-part question) become one comma-separated answer."""
    answers = row.get("final_answer")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        return row
    return {**row, "answer": ", ".join(a.strip().strip("$").strip() for a in answers)}


GPQA_LETTERS = "ABCD"


def _gpqa_choices(row: dict) -> dict:
    """GPQA: the question with its four options lettered A-D in an order fixed by the record id
    (the source lists the correct option first); the gold answer is the correct option's letter."""
    keys = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    question = row.get("Question")
    options = [o for o in map(row.get, keys) if isinstance(o, str) and o.strip()]
    if not (isinstance(question, str) and question.strip()) or len(options) < len(keys):
        return row
    order = random.Random(str(row.get("Record ID") or question)).sample(range(4), 4)
    lines = [f"({GPQA_LETTERS[i]}) {options[j].strip()}" for i, j in enumerate(order)]
    problem = (
        f"{question.strip()}\n\n"
        + "\n".join(lines)
        + "\n\nAnswer with the letter of the correct option."
    )
    return {**row, "problem": problem, "answer": GPQA_LETTERS[order.index(0)]}


BENCHMARKS: dict[str, Benchmark] = {
    "math": Benchmark("DigitalLearningGmbH/MATH-lighteval", "train", "problem", "solution",
                      level="level", extract=extract_answer),  # the last \boxed{}
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", "problem", "answer", id="unique_id",
                         level="level"),
    "gsm8k": Benchmark("openai/gsm8k", "test", "question", "answer", config="main",
                       extract=_after_hashes),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", "problem", "answer", id="id"),
    "aime25": Benchmark("math-ai/aime25", "test", "problem", "answer", id="id"),
    "amc23": Benchmark("math-ai/amc23", "test", "question", "answer"),
    # Minerva Math (272 quantitative-reasoning problems): bare answers, no ids. SimpleRL-Zoo's
    # copy has only worked solutions, the answer in their last \boxed{}.
    "minerva_math": Benchmark("math-ai/minervamath", "test", "question", "answer",
                              local=Columns("problem", "solution", extract=extract_answer)),
    # OlympiadBench, its 675 open-ended, text-only, English competition-math problems.
    "olympiadbench": Benchmark("Hothan/OlympiadBench", "train", "question", "answer", id="id",
                               config="OE_TO_maths_en_COMP", prepare=_olympiad_answer),
    # GPQA-Diamond (198 science questions, gated on the hub): `Question`, `Correct Answer`,
    # `Incorrect Answer 1..3`, `Record ID`, as in the original CSV.
    "gpqa_diamond": Benchmark("Idavidrein/gpqa", "train", "problem", "answer", id="Record ID",
                              config="gpqa_diamond", prepare=_gpqa_choices),
}  # fmt: skip


# --- the built-in offline benchmark ----------------------------------------------------------

OFFLINE = "offline"
# reasoning-gym tasks whose answers the math grader reads; a seed no generation default uses.
OFFLINE_TASKS = ("basic_arithmetic", "chain_sum", "simple_equations", "gsm_symbolic")
OFFLINE_SEED = 20072
OFFLINE_SIZE = 50  # per task

KHOP = "khop"  # the held-out questions of the k-hop world (w2sr.data.world)

EVAL_BENCHMARKS = (*sorted(n for n in BENCHMARKS if n != "math"), OFFLINE, KHOP)
