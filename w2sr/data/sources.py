"""Prompt sources: math problems with verifiable answers, from any of four places, validated alike.

Every source is read into `(index, raw row)` pairs plus a field mapping, and one validation pass
turns them into good rows `{"prompt_id", "problem", "answer"}` and rejected rows
`{"index", "prompt_id", "reason", "row"}`. Nothing is dropped silently: a row is either kept, or
rejected with its reason, or (benchmark level filters only) deliberately not selected.

`prompt_id` is stable across runs: the source's own id when it has one, else
`"{source}-{index}"` with the row's index in the source (so rejecting or filtering a row never
renumbers the others).

`datasets` and `reasoning_gym` are imported inside the functions that need them: both are slow to
import, and nothing here may touch the network before a source is actually loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from w2sr.config import (
    BenchmarkSource,
    FileSource,
    HFSource,
    KHopSource,
    PromptsConfig,
    ReasoningGymSource,
)
from w2sr.data.benchmarks import (
    BENCHMARKS,
    KHOP,
    OFFLINE,
    OFFLINE_SEED,
    OFFLINE_SIZE,
    OFFLINE_TASKS,
)

Record = tuple[int, Any]  # (index in the source, the raw row: a dict, or _Unparsed)


@dataclass(frozen=True)
class Fields:
    """Where a source keeps the problem, the answer and the id, and how to name id-less rows."""

    problem: str
    answer: str
    id: str | None
    prefix: str
    extract: Callable[[str], str | None] | None = None  # final answer out of a worked solution


@dataclass(frozen=True)
class _Unparsed:
    """A line of a JSON-lines file that is not UTF-8 JSON: rejected, never a crash."""

    line: str
    error: str


def load_prompts(cfg: PromptsConfig) -> tuple[list[dict], list[dict]]:
    """Returns (rows, rejected).

    `cfg.limit` keeps the first N *good* rows; it applies after validation, so a bad row never
    takes a slot, and `rejected` lists the rejections of the whole source.
    """
    source = cfg.source
    records, fields = _READERS[source.type](source)
    rows, rejected = validate_rows(records, fields)
    return (rows[: cfg.limit] if cfg.limit else rows), rejected


# --- validation (shared by every source) -----------------------------------------------------


def validate_rows(records: Iterable[Record], fields: Fields) -> tuple[list[dict], list[dict]]:
    """Split raw rows into good and rejected ones; the first row with an id wins the id."""
    rows: list[dict] = []
    rejected: list[dict] = []
    seen: set[str] = set()
    for index, raw in records:
        prompt_id, problem, answer, reason = _check(index, raw, fields)
        if reason is None and prompt_id in seen:
            reason = f"duplicate id {prompt_id!r}"
        if reason is not None:
            rejected.append(
                {"index": index, "prompt_id": prompt_id, "reason": reason, "row": _dump(raw)}
            )
            continue
        seen.add(prompt_id)
        rows.append({"prompt_id": prompt_id, "problem": problem, "answer": answer})
    return rows, rejected


def _check(index: int, raw: Any, fields: Fields) -> tuple[str | None, str, str, str | None]:
    """(prompt_id, problem, answer, reason); reason is None for a good row."""
    if isinstance(raw, _Unparsed):
        reason = (
            raw.error if raw.error.startswith("invalid UTF-8") else f"invalid JSON: {raw.error}"
        )
        return None, "", "", reason
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
    if not str(value).strip():
        return None, "empty id"
    return str(value).strip(), None


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
    text = str(value).strip()
    if not text:
        return "", "empty answer"
    if fields.extract is not None:
        text = fields.extract(text)
        if not text:
            return "", "no final answer found"
    return text, None


def _dump(raw: Any) -> str:
    if isinstance(raw, _Unparsed):
        return raw.line
    return json.dumps(raw, default=str, ensure_ascii=False)


# --- sources ---------------------------------------------------------------------------------


def _read_reasoning_gym(source: ReasoningGymSource) -> tuple[list[Record], Fields]:
    """Procedural problems: the same task, size, seed and task_config give the same rows (the
    config has checked the task and its settings)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(
        source.task, size=source.size, seed=source.seed, **source.task_config
    )
    records = [(i, dict(item)) for i, item in enumerate(dataset)]
    return records, Fields("question", "answer", None, f"{source.task}-{source.seed}")


def _read_file(source: FileSource) -> tuple[list[Record], Fields]:
    fields = Fields(source.problem_field, source.answer_field, source.id_field, _stem(source.path))
    return list(_file_records(source.path)), fields


def _read_hf(source: HFSource) -> tuple[list[Record], Fields]:
    prefix = f"{_stem(source.path)}-{source.split}"
    fields = Fields(source.problem_field, source.answer_field, source.id_field, prefix)
    return list(enumerate(_hf_rows(source.path, source.name, source.split))), fields


def _read_benchmark(source: BenchmarkSource) -> tuple[list[Record], Fields]:
    return _benchmark_records(source.name, source.path, source.split, source.levels)


def _benchmark_records(
    name: str, path: str | None, split: str | None, levels: list[int] | None
) -> tuple[list[Record], Fields]:
    bench = BENCHMARKS[name]
    split = split or bench.split
    if path is None:
        records = enumerate(_hf_rows(bench.hub, bench.config, split))
    elif os.path.isdir(path):
        records = enumerate(_local_hf_rows(path, split))
    else:
        records = _file_records(path)
    if bench.prepare is not None:
        records = ((i, bench.prepare(raw) if isinstance(raw, dict) else raw) for i, raw in records)
    if levels is not None:
        # A selection, not a rejection: rows of other levels (or MATH's few "Level ?") are left
        # out on purpose, keeping their index so the ids of the selected rows do not move. Rows
        # that are not objects at all go on to validation, to be rejected with their reason.
        wanted = set(levels)
        records = (
            (i, raw)
            for i, raw in records
            if not isinstance(raw, dict) or _level(raw.get(bench.level)) in wanted
        )
    fields = Fields(bench.problem, bench.answer, bench.id, f"{name}-{split}", bench.extract)
    return list(records), fields


def _read_khop(source: KHopSource) -> tuple[list[Record], Fields]:
    from w2sr.data.world import prompt_rows

    return list(enumerate(prompt_rows(source.split))), Fields(
        "problem", "answer", id="prompt_id", prefix="khop"
    )


_READERS: dict[str, Callable[[Any], tuple[list[Record], Fields]]] = {
    "khop": _read_khop,
    "reasoning_gym": _read_reasoning_gym,
    "file": _read_file,
    "hf": _read_hf,
    "benchmark": _read_benchmark,
}


def _offline_rows() -> tuple[list[dict], list[dict]]:
    """Procedural problems for CPU runs: the same 200 on every machine, tasks interleaved so any
    prefix (`limit`) is a balanced mix. Disjointness from training prompts is enforced at eval
    time, against the run's own prompt set."""
    per_task = []
    rejected: list[dict] = []
    for task in OFFLINE_TASKS:
        source = ReasoningGymSource(task=task, size=OFFLINE_SIZE, seed=OFFLINE_SEED)
        rows, bad = validate_rows(*_read_reasoning_gym(source))
        per_task.append(rows)
        rejected += bad
    mixed = [row for group in zip(*per_task, strict=False) for row in group]
    return mixed, rejected


def load_benchmark(
    name: str, path: str | None = None, split: str | None = None, limit: int | None = None
) -> tuple[list[dict], list[dict]]:
    """A benchmark's problems as prompt rows, validated like any source: (rows, rejected)."""
    if name == OFFLINE:
        rows, rejected = _offline_rows()
    elif name == KHOP:
        rows, rejected = validate_rows(*_read_khop(KHopSource(split="heldout")))
    else:
        rows, rejected = validate_rows(*_benchmark_records(name, path, split, None))
    return (rows[:limit] if limit else rows), rejected


def _level(value: Any) -> int | None:
    """MATH writes "Level 3", MATH-500 writes 3; anything else has no level."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value) if isinstance(value, str) else None
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
                yield index, _Unparsed(line, str(error))
    else:
        raise ValueError(f"unsupported prompt file {path!r}: expected .jsonl, .json or .parquet")


def _hf_rows(path: str, name: str | None, split: str) -> Iterable[dict]:
    """A hub dataset by id, or a local folder (save_to_disk output or data files)."""
    if os.path.isdir(path):
        return _local_hf_rows(path, split)
    import datasets

    return datasets.load_dataset(path, name, split=split)


def _local_hf_rows(path: str, split: str) -> Iterable[dict]:
    """A local folder: `load_from_disk` for a save_to_disk folder, else its data files.

    A folder holding a single split serves that split whatever its name (data files named
    `data.jsonl` load as "train"); with several, `split` must be one of them.
    """
    import datasets

    saved = any(
        os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )
    loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
