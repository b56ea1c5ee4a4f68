"""Prompt sources: math problems with verifiable answers, from any of four places, validated alike.

Every source is read, split by split, into `(index, raw row)` pairs plus a field mapping, and one
validation pass turns them into good rows `{"prompt_id", "problem", "answer"}` and rejected rows
`{"index", "prompt_id", "reason", "row"}`. Nothing is dropped silently: a row is either kept, or
rejected with its reason, or (benchmark level filters and exclusions only) deliberately not
selected.

`prompt_id` is stable across runs: the source's own id when it has one, else
`"{source}-{index}"` (`"{benchmark}-{split}-{index}"` for a benchmark) with the row's index in
its split, so rejecting or filtering a row never renumbers the others, and splits joined with
"+" keep their own numbering.

`datasets` and `reasoning_gym` are imported inside the functions that need them: both are slow to
import, and nothing here may touch the network before a source is actually loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from w2sr.data.benchmarks import (
    BENCHMARKS,
    KHOP,
    OFFLINE,
    OFFLINE_SEED,
    OFFLINE_SIZE,
    OFFLINE_TASKS,
    Columns,
)
from w2sr.grading import extract_answer
from w2sr.strict import ConfigError, PositiveInt, Strict, first_line

if TYPE_CHECKING:
    from w2sr.config import PromptsConfig

log = logging.getLogger(__name__)


# --- the sources a config names ------------------------------------------------------------


class ReasoningGymSource(Strict):
    """Procedural problems from a reasoning-gym task: offline and deterministic under a seed."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    task: str = "basic_arithmetic"
    size: PositiveInt = 64
    seed: int = 0
    task_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _task_exists(self) -> ReasoningGymSource:
        """The task and its settings are checked here, by the task's own config class."""
        import difflib

        from reasoning_gym.factory import DATASETS

        if self.task not in DATASETS:
            close = difflib.get_close_matches(self.task, DATASETS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"task: unknown reasoning_gym task {self.task!r}{hint}")
        _, config_class = DATASETS[self.task]
        try:
            config_class(size=self.size, seed=self.seed, **self.task_config).validate()
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(f"task_config: {error}") from None
        return self


class KHopSource(Strict):
    """The k-hop lookup world of the CPU demo (`w2sr.data.world`): `train` questions for traces,
    `heldout` ones for evaluation."""

    type: Literal["khop"] = "khop"
    split: Literal["train", "heldout"] = "train"


class FileSource(Strict):
    """Local or remote JSONL / Parquet rows."""

    type: Literal["file"] = "file"
    path: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None


class HFSource(Strict):
    """A Hugging Face dataset by hub id or local path (a `save_to_disk` folder or data files)."""

    type: Literal["hf"] = "hf"
    path: str
    name: str | None = None
    split: str = "train"
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None


class BenchmarkRef(Strict):
    """A standard benchmark by name (`w2sr.data.benchmarks.BENCHMARKS`), from the hub or a local
    copy (`path`: a JSONL or Parquet file, or a dataset folder).

    A local copy is read with the benchmark's own column names, or, for the copies that
    SimpleRL-Zoo's evaluator ships, with that file's (a preset per benchmark); the `*_field` keys
    name the columns of any other copy. `solution_field` names a worked solution whose last
    `\\boxed{}` is the answer, for copies that have no answer column (MATH, Minerva).
    """

    name: str
    path: str | None = None
    split: str | None = None  # splits may be joined with "+": "train+test"
    problem_field: str | None = None
    answer_field: str | None = None
    solution_field: str | None = None
    id_field: str | None = None
    SILENT_AT_DEFAULT = frozenset({"problem_field", "answer_field", "solution_field", "id_field"})

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> BenchmarkRef:
        if self.name in (OFFLINE, KHOP):
            if self.path or self.split or self.fields_given():
                raise ValueError(f"{self.name!r} is built in: it takes no path, split or fields")
        elif self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}; one of {sorted(BENCHMARKS)}")
        if self.answer_field and self.solution_field:
            raise ValueError("solution_field: give answer_field or solution_field, not both")
        return self

    def fields_given(self) -> dict[str, str]:
        """The column names set in the config, by role (problem, answer, solution, id)."""
        named = {
            "problem": self.problem_field,
            "answer": self.answer_field,
            "solution": self.solution_field,
            "id": self.id_field,
        }
        return {role: column for role, column in named.items() if column}


class BenchmarkSource(BenchmarkRef):
    """Training problems from a standard set, e.g. MATH levels 3-5 of train and test less the
    MATH-500 problems (SimpleRL-Zoo's training set): `exclude` leaves out every problem that is
    also in one of those benchmarks."""

    type: Literal["benchmark"] = "benchmark"
    levels: list[Annotated[int, Field(ge=1, le=5)]] | None = None
    exclude: list[BenchmarkRef] = Field(default_factory=list)
    SILENT_AT_DEFAULT = BenchmarkRef.SILENT_AT_DEFAULT | {"exclude"}

    @model_validator(mode="after")
    def _levels_only_for_math(self) -> BenchmarkSource:
        if self.levels is not None and self.name not in ("math", "math500"):
            raise ValueError("levels applies only to math and math500")
        if self.name not in BENCHMARKS:
            raise ValueError(f"name: {self.name!r} is built in for evaluation, not a prompt source")
        return self


PromptSource = Annotated[
    ReasoningGymSource | KHopSource | FileSource | HFSource | BenchmarkSource,
    Field(discriminator="type"),
]


Record = tuple[int, Any]  # (index in its split, the raw row: a dict, or _Unparsed)


@dataclass(frozen=True)
class Fields:
    """Where a source keeps the problem, the answer and the id, and how to name id-less rows."""

    problem: str
    answer: str
    id: str | None
    prefix: str
    extract: Callable[[str], str | None] | None = None  # final answer out of a worked solution


Part = tuple[list[Record], Fields]  # the rows of one split, and how to read them


@dataclass(frozen=True)
class _Unparsed:
    """A line of a JSON-lines file that cannot be read (not UTF-8, not JSON, or JSON that Python
    will not hold): rejected with `reason`, never a crash."""

    line: str
    reason: str


def load_training_problems(cfg: PromptsConfig) -> tuple[list[dict], list[dict]]:
    """The problems of the `prompts` source, validated (rows of problem, answer, id), and the
    rows set aside with the reason: (rows, rejected).

    `cfg.limit` keeps the first N *good* rows; it applies after validation, so a bad row never
    takes a slot, and `rejected` lists the rejections of the whole source.
    """
    rows, rejected = validate_rows(_READERS[cfg.source.type](cfg.source))
    return (rows[: cfg.limit] if cfg.limit else rows), rejected


def load_benchmark(ref: BenchmarkRef) -> tuple[list[dict], list[dict]]:
    """A benchmark's problems as prompt rows, validated like any source: (rows, rejected).

    All of them: a `limit` is the caller's to apply. The built-in `offline` and `khop` sets
    take no path, split or fields.
    """
    return _load_benchmark(ref, "eval.benchmarks[].path")


def normal_text(text: str) -> str:
    """A problem's text as compared across sources: whitespace runs collapsed, lower-cased."""
    return " ".join(text.split()).lower()


# --- validation (shared by every source) -----------------------------------------------------


def validate_rows(parts: Iterable[Part]) -> tuple[list[dict], list[dict]]:
    """Split raw rows into good and rejected ones; the first row with an id wins the id."""
    rows: list[dict] = []
    rejected: list[dict] = []
    seen: set[str] = set()
    for records, fields in parts:
        for index, raw in records:
            prompt_id, problem, answer, reason = _check(index, raw, fields)
            if reason is None and prompt_id in seen:
                reason = f"duplicate id {prompt_id!r}"
            if reason is not None:
                rejected.append(
                    {"index": index, "prompt_id": prompt_id, "reason": reason, "row": _dump(raw)}
                )
                continue
            assert prompt_id is not None  # a good row has its id
            seen.add(prompt_id)
            rows.append({"prompt_id": prompt_id, "problem": problem, "answer": answer})
    return rows, rejected


def _check(index: int, raw: Any, fields: Fields) -> tuple[str | None, str, str, str | None]:
    """(prompt_id, problem, answer, reason); reason is None for a good row."""
    if isinstance(raw, _Unparsed):
        return None, "", "", raw.reason
    if not isinstance(raw, dict):
        return None, "", "", f"wrong type: row is {type(raw).__name__}, not an object"
    prompt_id, reason = _id(index, raw, fields)
    if reason:
        return prompt_id, "", "", reason
    problem = raw.get(fields.problem)
    if problem is None:
        return prompt_id, "", "", "missing problem"
    if not isinstance(problem, str):
        return prompt_id, "", "", f"wrong type: problem is {type(problem).__name__}"
    if not problem.strip():
        return prompt_id, "", "", "empty problem"
    answer, reason = _answer(raw.get(fields.answer), fields)
    return prompt_id, problem.strip(), answer, reason


def _id(index: int, raw: dict, fields: Fields) -> tuple[str | None, str | None]:
    if fields.id is None:
        return f"{fields.prefix}-{index}", None
    value = raw.get(fields.id)
    if value is None:
        return None, "missing id"
    if isinstance(value, bool) or not isinstance(value, str | Integral):
        return None, f"wrong type: id is {type(value).__name__}"
    text, reason = _text(value, "id")
    if reason:
        return None, reason
    if not text.strip():
        return None, "empty id"
    return text.strip(), None


def _answer(value: Any, fields: Fields) -> tuple[str, str | None]:
    """Numbers become strings (an integral float such as AMC's 27.0 becomes "27")."""
    if value is None:
        return "", "missing answer"
    if isinstance(value, bool) or not isinstance(value, str | Real):
        return "", f"wrong type: answer is {type(value).__name__}"
    if isinstance(value, Real) and not isinstance(value, Integral):
        value = float(value)
        if value != value:  # NaN: how pandas spells a missing number
            return "", "missing answer"
        if value.is_integer():
            value = int(value)
    text, reason = _text(value, "answer")
    if reason:
        return "", reason
    text = text.strip()
    if not text:
        return "", "empty answer"
    if fields.extract is not None:
        extracted = fields.extract(text)
        if not extracted:
            return "", "no final answer found"
        text = extracted
    return text, None


def _text(value: str | Real, what: str) -> tuple[str, str | None]:
    """`str(value)`, or the reason it cannot be: Python refuses to write out an integer of more
    digits than `sys.get_int_max_str_digits()` (a guard against quadratic-time conversion)."""
    try:
        return str(value), None
    except ValueError:
        return "", f"{what} is {_too_long()}"


def _too_long() -> str:
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _unwritable(error: ValueError | RecursionError) -> str:
    """Why `json` could not read or write a value that is itself well-formed JSON."""
    return _too_long() if isinstance(error, ValueError) else "arrays or objects nested too deeply"


def _dump(raw: Any) -> str:
    """The row as JSON text for the rejection record; a row JSON cannot write (an integer too long,
    nesting too deep) is named by its type, so reporting it never fails."""
    if isinstance(raw, _Unparsed):
        return raw.line
    try:
        return json.dumps(raw, default=str, ensure_ascii=False)
    except (ValueError, RecursionError) as error:
        return f"<a {type(raw).__name__} JSON cannot write: {_unwritable(error)}>"


# --- sources ---------------------------------------------------------------------------------


def _read_reasoning_gym(source: ReasoningGymSource) -> list[Part]:
    """Procedural problems: the same task, size, seed and task_config give the same rows (the
    config has checked the task and its settings)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(
        source.task, size=source.size, seed=source.seed, **source.task_config
    )
    records = [(i, dict(item)) for i, item in enumerate(dataset)]
    return [(records, Fields("question", "answer", None, f"{source.task}-{source.seed}"))]


def _read_file(source: FileSource) -> list[Part]:
    fields = Fields(source.problem_field, source.answer_field, source.id_field, _stem(source.path))
    return [(list(_file_records(source.path)), fields)]


def _read_hf(source: HFSource) -> list[Part]:
    splits = _dataset_splits(
        source.path,
        source.name,
        source.split,
        f"prompts.source {source.path!r}",
        "set `prompts.source.path` to the local copy",
    )
    stem = _stem(source.path)
    return [
        (records, Fields(source.problem_field, source.answer_field, source.id_field, f"{stem}-{s}"))
        for s, records in splits
    ]


def _read_benchmark(source: BenchmarkSource) -> list[Part]:
    parts = _benchmark_parts(source, "prompts.source.path", source.levels)
    return _exclude(source, parts) if source.exclude else parts


def _benchmark_parts(ref: BenchmarkRef, key: str, levels: list[int] | None = None) -> list[Part]:
    """A benchmark's rows, split by split, with the columns its copy uses; `key` is the config
    key of the ref's path, for the message when the hub is needed and out of reach."""
    bench = BENCHMARKS[ref.name]
    split = ref.split or bench.split
    if ref.path is None:
        splits = _dataset_splits(
            bench.hub, bench.config, split, f"benchmark {ref.name}", f"set its `path` ({key})"
        )
    elif os.path.isdir(ref.path):
        splits = _local_splits(ref.path, split)
    elif "+" in split:
        raise ConfigError(
            f"{key}: benchmark {ref.name} joins splits {split!r}, but {ref.path} is one file; "
            "give the folder that holds them"
        )
    else:
        splits = [(split, list(_file_records(ref.path)))]
    if bench.prepare is not None:
        splits = [
            (s, [(i, bench.prepare(raw) if isinstance(raw, dict) else raw) for i, raw in records])
            for s, records in splits
        ]
    columns = _columns(ref, [raw for _, records in splits for _, raw in records])
    if levels is not None:
        splits = [(s, _of_levels(records, bench.level, set(levels))) for s, records in splits]
    return [
        (
            records,
            Fields(columns.problem, columns.answer, columns.id, f"{ref.name}-{s}", columns.extract),
        )
        for s, records in splits
    ]


def _of_levels(records: list[Record], column: str | None, wanted: set[int]) -> list[Record]:
    """A selection, not a rejection: rows of other levels (or MATH's few "Level ?") are left out
    on purpose, keeping their index so the ids of the selected rows do not move. Rows that are
    not objects at all go on to validation, to be rejected with their reason."""
    return [
        (i, raw)
        for i, raw in records
        if not isinstance(raw, dict) or _level(raw.get(column)) in wanted
    ]


def _columns(ref: BenchmarkRef, raws: Iterable[Any]) -> Columns:
    """The columns of a copy, decided once for all its rows (so one odd row is rejected with its
    reason rather than read another way): the hub's, or the registry's `local` layout when the
    first row lacks the hub's problem column and has the local one; then the ref's `*_field`
    keys on top."""
    bench = BENCHMARKS[ref.name]
    columns = bench.columns
    first = next((raw for raw in raws if isinstance(raw, dict)), {})
    local = bench.local
    if local is not None and columns.problem not in first and local.problem in first:
        columns = local
    given = ref.fields_given()
    if "answer" in given:
        columns = replace(columns, answer=given["answer"], extract=None)
    if "solution" in given:
        columns = replace(columns, answer=given["solution"], extract=extract_answer)
    return replace(
        columns,
        problem=given.get("problem", columns.problem),
        id=given.get("id", columns.id),
    )


def _exclude(source: BenchmarkSource, parts: list[Part]) -> list[Part]:
    """Leaves out the problems that are also in one of `source.exclude` (e.g. MATH-500 out of
    MATH): a selection, like the level filter, not a rejection."""
    excluded: set[str] = set()
    for ref in source.exclude:
        rows, _ = _load_benchmark(ref, "prompts.source.exclude[].path")
        excluded |= {normal_text(row["problem"]) for row in rows}
    kept_parts: list[Part] = []
    left_out = 0
    for records, fields in parts:
        kept = [(i, raw) for i, raw in records if not _is_in(raw, fields.problem, excluded)]
        left_out += len(records) - len(kept)
        kept_parts.append((kept, fields))
    names = ", ".join(ref.name for ref in source.exclude)
    log.info("%s: left out %d problems that are also in %s", source.name, left_out, names)
    return kept_parts


def _is_in(raw: Any, column: str, problems: set[str]) -> bool:
    problem = raw.get(column) if isinstance(raw, dict) else None
    return isinstance(problem, str) and normal_text(problem) in problems


def _read_khop(source: KHopSource) -> list[Part]:
    from w2sr.data.world import prompt_rows

    records = list(enumerate(prompt_rows(source.split)))
    return [(records, Fields("problem", "answer", id="prompt_id", prefix="khop"))]


_READERS: dict[str, Callable[[Any], list[Part]]] = {
    "khop": _read_khop,
    "reasoning_gym": _read_reasoning_gym,
    "file": _read_file,
    "hf": _read_hf,
    "benchmark": _read_benchmark,
}


def _load_benchmark(ref: BenchmarkRef, key: str) -> tuple[list[dict], list[dict]]:
    if ref.name == OFFLINE:
        return _offline_rows()
    if ref.name == KHOP:
        return validate_rows(_read_khop(KHopSource(split="heldout")))
    return validate_rows(_benchmark_parts(ref, key))


def _offline_rows() -> tuple[list[dict], list[dict]]:
    """Procedural problems for CPU runs: the same 200 on every machine, tasks interleaved so any
    prefix (`limit`) is a balanced mix. Disjointness from training prompts is enforced at eval
    time, against the run's own prompt set."""
    per_task = []
    rejected: list[dict] = []
    for task in OFFLINE_TASKS:
        source = ReasoningGymSource(task=task, size=OFFLINE_SIZE, seed=OFFLINE_SEED)
        rows, bad = validate_rows(_read_reasoning_gym(source))
        per_task.append(rows)
        rejected += bad
    mixed = [row for group in zip(*per_task, strict=False) for row in group]
    return mixed, rejected


def _level(value: Any) -> int | None:
    """MATH writes "Level 3", MATH-500 writes 3; anything else has no level."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if not isinstance(value, str):
        return None
    # At most 9 digits: int() of thousands raises, and no level is that high.
    match = re.fullmatch(r"\s*(?:Level\s*)?(\d{1,9})\s*", value)
    return int(match.group(1)) if match else None


# --- readers ---------------------------------------------------------------------------------


def _stem(path: str) -> str:
    """A short name for id-less rows: the file or folder name without its extension."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or name


def _open(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _file_records(path: str) -> Iterator[Record]:
    """JSON lines (`.jsonl` / `.json`) or Parquet, local or on any pyarrow filesystem.

    A JSON-lines row's index is its line number (blank lines are skipped, not rows).
    """
    fs, where = _open(path)
    if path.endswith(".parquet"):
        yield from enumerate(pq.read_table(where, filesystem=fs).to_pylist())
    elif path.endswith((".jsonl", ".json")):
        with fs.open_input_stream(where) as stream:
            data = stream.read()
        # Lines end at "\n" only: U+2028 and its kin may stand inside a JSON string, and one
        # bad byte costs its own line, not the set.
        for index, raw in enumerate(data.split(b"\n")):
            raw = raw.removesuffix(b"\r")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                text = raw.decode("utf-8", errors="replace")
                yield index, _Unparsed(text, f"invalid UTF-8 at byte {error.start}")
                continue
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as error:
                yield index, _Unparsed(line, f"invalid JSON: {error}")
            except (ValueError, RecursionError) as error:  # valid JSON that Python will not hold
                yield index, _Unparsed(line, f"unreadable JSON: {_unwritable(error)}")
    else:
        raise ValueError(f"unsupported prompt file {path!r}: expected .jsonl, .json or .parquet")


def _dataset_splits(
    path: str, config: str | None, split: str, what: str, fix: str
) -> list[tuple[str, list[Record]]]:
    """Each of the "+"-joined splits of a local folder or a hub dataset, in order, its rows
    indexed within it. `what` and `fix` word the error when the hub is needed and unreachable."""
    if os.path.isdir(path):
        return _local_splits(path, split)
    return [(s, list(enumerate(_hub_split(path, config, s, what, fix)))) for s in split.split("+")]


def _hub_split(path: str, config: str | None, split: str, what: str, fix: str) -> Iterable[dict]:
    """One split from the hub (or its cache); out of reach, a one-line ConfigError says what to
    do instead of a datasets traceback."""
    import datasets
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return datasets.load_dataset(path, config, split=split)
    except (ConnectionError, LocalEntryNotFoundError, httpx.TransportError) as error:
        cause = first_line(error)[:200]
        raise ConfigError(
            f"{what}: no local copy and the hub is unreachable ({cause}); download it and {fix}"
        ) from None


def _local_splits(path: str, split: str) -> list[tuple[str, list[Record]]]:
    """The "+"-joined splits of a local folder, in order: a save_to_disk folder's; else each
    split's `<split>.jsonl` / `.parquet` / `.json` file, read like any prompt file (one bad line
    costs one row, and splits need not share columns); else the folder as `datasets` reads data
    files (the hub's layout). A folder holding a single split serves one split of any name (data
    files named `data.jsonl` load as "train").
    """
    splits = split.split("+")
    saved = any(
        os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )
    files = {} if saved else _split_files(path)
    if files and all(s in files for s in splits):
        return [(s, list(_file_records(files[s]))) for s in splits]
    import datasets

    loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    named = {"": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if len(splits) == 1 and len(named) == 1:
        return [(split, list(enumerate(next(iter(named.values())))))]
    missing = [s for s in splits if s not in named]
    if missing:
        raise ValueError(f"{path}: no split {missing[0]!r}; it has {sorted(named)}")
    return [(s, list(enumerate(named[s]))) for s in splits]


_DATA_SUFFIXES = (".jsonl", ".parquet", ".json")  # the first wins when a split has several


def _split_files(path: str) -> dict[str, str]:
    """The data files at the top of a folder, by name without suffix."""
    files: dict[str, str] = {}
    for suffix in reversed(_DATA_SUFFIXES):
        for name in sorted(os.listdir(path)):
            if name.endswith(suffix) and os.path.isfile(os.path.join(path, name)):
                files[name.removesuffix(suffix)] = os.path.join(path, name)
    return files
