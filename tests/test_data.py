"""Prompt sources: every source yields the same row shape; bad rows are rejected with a reason."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from w2sr.config import ConfigError, EvalBenchmark, PromptsConfig
from w2sr.data.benchmarks import BENCHMARKS
from w2sr.data.sources import Fields, load_benchmark, load_training_problems, validate_rows

# Small copies in the layout of the files SimpleRL-Zoo's evaluator ships
# (examples/simplelr_math_eval/data/<name>/test.jsonl): the real columns and answer formats,
# invented problems.
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    """No hub lookups, and the Arrow cache `load_dataset` writes for data files stays in tmp."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def load(limit: int | None = None, **source) -> tuple[list[dict], list[dict]]:
    return load_training_problems(PromptsConfig.model_validate({"source": source, "limit": limit}))


def bench(**ref) -> tuple[list[dict], list[dict]]:
    return load_benchmark(EvalBenchmark.model_validate(ref))


def fixture(name: str, split: str = "test") -> str:
    return str(FIXTURES / name / f"{split}.jsonl")


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def reasons(rejected: list[dict]) -> dict[int, str]:
    return {r["index"]: r["reason"] for r in rejected}


# --- reasoning_gym ---------------------------------------------------------------------------


def test_reasoning_gym_is_deterministic_under_its_seed():
    rows, rejected = load(type="reasoning_gym", task="chain_sum", size=8, seed=3)
    again, _ = load(type="reasoning_gym", task="chain_sum", size=8, seed=3)
    other, _ = load(type="reasoning_gym", task="chain_sum", size=8, seed=4)
    assert rejected == []
    assert rows == again
    assert rows != other
    assert len(rows) == 8 and len({r["prompt_id"] for r in rows}) == 8
    assert rows[0]["prompt_id"] == "chain_sum-3-0"
    for row in rows:
        assert set(row) == {"prompt_id", "problem", "answer"}
        assert row["problem"] and row["answer"]
        int(row["answer"])  # chain_sum answers are plain integers


def test_reasoning_gym_task_config_and_unknown_task():
    rows, _ = load(
        type="reasoning_gym",
        task="basic_arithmetic",
        size=4,
        task_config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    )
    assert len(rows) == 4
    with pytest.raises(ValueError, match="no_such_task"):
        load(type="reasoning_gym", task="no_such_task")
    with pytest.raises(ValueError, match="did you mean chain_sum"):
        load(type="reasoning_gym", task="chain_sums")
    with pytest.raises(ValueError, match="task_config.*bogus"):
        load(type="reasoning_gym", task="chain_sum", task_config={"bogus": 1})


# --- files -----------------------------------------------------------------------------------

MAPPED = [
    {"key": "a", "question": "1+1?", "gold": 2},
    {"key": "b", "question": "2+2?", "gold": 4},
    {"key": "c", "question": "3+3?", "gold": 6},
]  # int answers, as many hub sets store them
MAPPING = {"problem_field": "question", "answer_field": "gold", "id_field": "key"}


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_file_with_field_mapping(tmp_path, suffix):
    target = tmp_path / f"prompts.{suffix}"
    path = write_parquet(target, MAPPED) if suffix == "parquet" else write_jsonl(target, MAPPED)
    rows, rejected = load(type="file", path=path, **MAPPING)
    assert rejected == []
    assert rows == [  # numbers become strings
        {"prompt_id": "a", "problem": "1+1?", "answer": "2"},
        {"prompt_id": "b", "problem": "2+2?", "answer": "4"},
        {"prompt_id": "c", "problem": "3+3?", "answer": "6"},
    ]


def test_file_uri_and_ids_without_id_field(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"problem": "p", "answer": "1"}] * 2)
    rows, _ = load(type="file", path=f"file://{path}")
    assert [r["prompt_id"] for r in rows] == ["gsm-0", "gsm-1"]


def test_malformed_rows_are_rejected_with_reasons(tmp_path):
    lines = [
        {"id": "ok1", "problem": "good", "answer": "1"},
        {"id": "r1", "answer": "1"},
        {"id": "r2", "problem": "   ", "answer": "1"},
        {"id": "r3", "problem": 7, "answer": "1"},
        {"id": "r4", "problem": "no answer"},
        {"id": "r5", "problem": "blank answer", "answer": ""},
        {"id": "r6", "problem": "list answer", "answer": [1, 2]},
        {"id": "r7", "problem": "dict answer", "answer": {"x": 1}},
        '{"id": "r8", "problem": "broken',
        {"id": "ok1", "problem": "same id again", "answer": "2"},
        {"id": "ok2", "problem": "good too", "answer": 12},
        [1, 2, 3],
        {"problem": "no id", "answer": "3"},
    ]
    rows, rejected = load(type="file", path=write_jsonl(tmp_path / "p.jsonl", lines), id_field="id")
    assert rows == [
        {"prompt_id": "ok1", "problem": "good", "answer": "1"},
        {"prompt_id": "ok2", "problem": "good too", "answer": "12"},
    ]
    assert len(rows) + len(rejected) == len(lines)  # nothing dropped silently
    got = reasons(rejected)
    assert got[1] == "missing problem"
    assert got[2] == "empty problem"
    assert got[3] == "wrong type: problem is int"
    assert got[4] == "missing answer"
    assert got[5] == "empty answer"
    assert got[6] == "wrong type: answer is list"
    assert got[7] == "wrong type: answer is dict"
    assert got[8].startswith("invalid JSON: ")
    assert got[9] == "duplicate id 'ok1'"
    assert got[11].startswith("wrong type: row is list")
    assert got[12] == "missing id"
    by_index = {r["index"]: r for r in rejected}
    assert by_index[3]["prompt_id"] == "r3"
    assert json.loads(by_index[3]["row"]) == lines[3]
    assert by_index[8]["row"] == lines[8] and by_index[8]["prompt_id"] is None
    for r in rejected:
        assert set(r) == {"index", "prompt_id", "reason", "row"} and isinstance(r["row"], str)


def test_bad_bytes_and_unicode_line_separators_cost_one_row_at_most(tmp_path):
    """JSON lines end at "\\n" only: U+2028 inside a string is text, an invalid UTF-8 byte
    rejects its own line, and the rows after either keep their ids."""
    good = [{"problem": f"p{i}", "answer": str(i)} for i in range(4)]
    good[1]["problem"] = "line\u2028separator\u2029paragraph\x85next"
    data = b"\n".join(
        [
            json.dumps(good[0]).encode(),
            json.dumps(good[1], ensure_ascii=False).encode(),
            b'{"problem": "bad \xff byte", "answer": "9"}',
            json.dumps(good[2]).encode() + b"\r",  # a CRLF line
            json.dumps(good[3]).encode(),
        ]
    )
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    rows, rejected = load(type="file", path=str(path))
    assert [r["prompt_id"] for r in rows] == ["mixed-0", "mixed-1", "mixed-3", "mixed-4"]
    assert rows[1]["problem"] == good[1]["problem"]
    assert [(r["index"], r["reason"]) for r in rejected] == [(2, "invalid UTF-8 at byte 17")]
    assert "bad" in rejected[0]["row"]


def test_json_python_will_not_hold_costs_its_own_row(tmp_path):
    """A 5,000-digit integer (over Python's int-to-str limit) and arrays nested 100,000 deep are
    valid JSON that `json.loads` refuses: each rejects its own line, never the set."""
    big = "7" * 5000
    lines = [
        {"problem": "p0", "answer": "0"},
        f'{{"problem": "huge answer", "answer": {big}}}',
        {"problem": "p2", "answer": "2"},
        '{"problem": "deep", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}",
        f'{{"id": {big}, "problem": "huge id", "answer": "4"}}',
        {"problem": "p5", "answer": "5"},
    ]
    rows, rejected = load(type="file", path=write_jsonl(tmp_path / "p.jsonl", lines))
    assert [r["prompt_id"] for r in rows] == ["p-0", "p-2", "p-5"]
    got = reasons(rejected)
    assert set(got) == {1, 3, 4}
    assert "digits" in got[1] and "digits" in got[4]
    assert "nested too deeply" in got[3]
    assert {r["row"] for r in rejected} == {lines[1], lines[3], lines[4]}  # as written


def test_values_python_cannot_write_reject_their_row_in_every_source():
    """Rows that arrive as Python objects (Parquet, datasets, reasoning_gym, a benchmark's own
    preparation) are validated alike: an id or answer too long to write out, or a row too deep
    for JSON to record, is a rejection with its reason, not an error for the set."""
    huge = 10**5000
    deep: list = [1]
    for _ in range(100_000):
        deep = [deep]
    records = [
        (0, {"id": 1, "problem": "p", "answer": 2}),
        (1, {"id": 2, "problem": "huge answer", "answer": huge}),
        (2, {"id": huge, "problem": "huge id", "answer": "3"}),
        (3, {"id": 4, "problem": "deep answer", "answer": deep}),
        (4, {"id": 5, "problem": "q", "answer": 5.0}),
    ]
    rows, rejected = validate_rows([(records, Fields("problem", "answer", "id", "x"))])
    assert rows == [
        {"prompt_id": "1", "problem": "p", "answer": "2"},
        {"prompt_id": "5", "problem": "q", "answer": "5"},
    ]
    got = reasons(rejected)
    assert got[1] == f"answer is an integer of more than {sys.get_int_max_str_digits()} digits"
    assert got[2] == f"id is an integer of more than {sys.get_int_max_str_digits()} digits"
    assert got[3] == "wrong type: answer is list"
    for r in rejected:
        assert isinstance(r["row"], str) and r["row"]


def test_a_level_of_thousands_of_digits_is_no_level(tmp_path):
    rows_in = [
        {"problem": "P1", "answer": "1", "level": 3, "unique_id": "a"},
        {"problem": "P2", "answer": "2", "level": "Level " + "9" * 5000, "unique_id": "b"},
        {"problem": "P3", "answer": "3", "level": "Level 3", "unique_id": "c"},
    ]
    path = write_jsonl(tmp_path / "test.jsonl", rows_in)
    rows, rejected = load(type="benchmark", name="math500", path=path, levels=[3])
    assert [r["prompt_id"] for r in rows] == ["a", "c"] and rejected == []


def test_limit_keeps_first_good_rows(tmp_path):
    lines = [{"problem": "bad"}] + [{"problem": f"q{i}", "answer": str(i)} for i in range(5)]
    rows, rejected = load(limit=3, type="file", path=write_jsonl(tmp_path / "p.jsonl", lines))
    assert [r["answer"] for r in rows] == ["0", "1", "2"]
    assert [r["index"] for r in rejected] == [0]


def test_unknown_file_type(tmp_path):
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="p.csv"):
        load(type="file", path=str(tmp_path / "p.csv"))


# --- Hugging Face datasets -------------------------------------------------------------------


def test_hf_save_to_disk_folder(tmp_path):
    datasets.Dataset.from_list(MAPPED).save_to_disk(str(tmp_path / "saved"))
    rows, rejected = load(type="hf", path=str(tmp_path / "saved"), **MAPPING)
    assert rejected == [] and [r["answer"] for r in rows] == ["2", "4", "6"]

    splits = {
        "train": datasets.Dataset.from_list(MAPPED[:1]),
        "test": datasets.Dataset.from_list(MAPPED[1:]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    rows, _ = load(type="hf", path=str(tmp_path / "dict"), split="test", **MAPPING)
    assert [r["prompt_id"] for r in rows] == ["b", "c"]


def test_hf_data_files_folder(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"problem": "p", "answer": "1"}])
    rows, _ = load(type="hf", path=str(folder))
    assert rows == [{"prompt_id": "files-train-0", "problem": "p", "answer": "1"}]


# --- benchmarks: local copies in each hub set's own column layout ----------------------------


def test_math_levels_and_boxed_answers(tmp_path):
    train = [
        {"problem": "A", "level": "Level 1", "type": "Algebra", "solution": "so \\boxed{1}."},
        {"problem": "B", "level": "Level 3", "type": "Algebra",
         "solution": "First \\boxed{2}, then $\\boxed{\\frac{1}{2}}$."},
        {"problem": "C", "level": "Level 5", "type": "Geometry", "solution": "no box here"},
        {"problem": "D", "level": "Level ?", "type": "Geometry", "solution": "\\boxed{4}"},
        {"problem": "E", "level": "Level 4", "type": "Geometry", "solution": "\\boxed{x^{2}}"},
    ]  # fmt: skip
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train)}).save_to_disk(tmp_path / "m")
    rows, rejected = load(type="benchmark", name="math", path=str(tmp_path / "m"), levels=[3, 4, 5])
    assert rows == [
        {"prompt_id": "math-train-1", "problem": "B", "answer": "\\frac{1}{2}"},
        {"prompt_id": "math-train-4", "problem": "E", "answer": "x^{2}"},
    ]
    assert [(r["index"], r["reason"]) for r in rejected] == [(2, "no final answer found")]

    everything, _ = load(type="benchmark", name="math", path=str(tmp_path / "m"))
    assert [r["answer"] for r in everything] == ["1", "\\frac{1}{2}", "4", "x^{2}"]


def test_math500_int_levels_and_unique_ids(tmp_path):
    rows_in = [
        {"problem": f"P{lvl}", "solution": "...", "answer": f"{lvl}0", "subject": "Algebra",
         "level": lvl, "unique_id": f"test/algebra/{lvl}.json"}
        for lvl in (1, 2, 3, 4, 5)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "test.jsonl", [*rows_in, '{"problem": "cut off'])
    rows, rejected = load(type="benchmark", name="math500", path=path, levels=[2, 5])
    assert [r["reason"][:13] for r in rejected] == ["invalid JSON:"]  # not filtered away
    assert rows == [
        {"prompt_id": "test/algebra/2.json", "problem": "P2", "answer": "20"},
        {"prompt_id": "test/algebra/5.json", "problem": "P5", "answer": "50"},
    ]


def test_gsm8k_answer_after_hashes(tmp_path):
    rows_in = [
        {"question": "How many?", "answer": "Work: 1000+234 = <<1000+234=1234>>\n#### 1,234"},
        {"question": "And now?", "answer": "Thinking\n#### 7"},
        {"question": "Broken", "answer": "forgot the marker: 9"},
    ]
    rows, rejected = load(
        type="benchmark", name="gsm8k", path=write_parquet(tmp_path / "test.parquet", rows_in)
    )
    assert [r["answer"] for r in rows] == ["1234", "7"]
    assert rows[0]["prompt_id"] == "gsm8k-test-0"
    assert reasons(rejected) == {2: "no final answer found"}


def test_aime_and_amc(tmp_path):
    aime24 = tmp_path / "aime24"
    aime24.mkdir()
    write_parquet(
        aime24 / "train.parquet",
        [{"id": 60, "problem": "P", "solution": "S", "answer": "204", "url": "u", "year": "2024"}],
    )
    rows, _ = load(type="benchmark", name="aime24", path=str(aime24))
    assert rows == [{"prompt_id": "60", "problem": "P", "answer": "204"}]

    aime25 = write_jsonl(tmp_path / "aime25.jsonl", [{"problem": "Q", "answer": "70", "id": "0"}])
    rows, _ = load(type="benchmark", name="aime25", path=aime25)
    assert rows == [{"prompt_id": "0", "problem": "Q", "answer": "70"}]

    amc = [{"id": 0, "question": "R", "answer": 27.0, "url": "u"}]
    datasets.Dataset.from_list(amc).save_to_disk(str(tmp_path / "amc23"))
    rows, _ = load(type="benchmark", name="amc23", path=str(tmp_path / "amc23"))
    assert rows == [{"prompt_id": "amc23-test-0", "problem": "R", "answer": "27"}]


def test_benchmarks_come_from_the_hub_without_a_path(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "Q", "answer": "x\n#### 5"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = load(type="benchmark", name="gsm8k", split="train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert rows == [{"prompt_id": "gsm8k-train-0", "problem": "Q", "answer": "5"}]
    assert {"math", "math500", "gsm8k", "aime24", "aime25", "amc23"} <= set(BENCHMARKS)


# --- benchmarks: the copies SimpleRL-Zoo's evaluator ships, read with no field settings -------


def test_simplerl_math500():
    rows, rejected = bench(name="math500", path=fixture("math500"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("test/prealgebra/9001.json", "11"),
        ("test/prealgebra/9002.json", "\\frac{3}{4}"),
        ("test/counting_and_probability/9003.json", "12"),
        ("test/precalculus/9004.json", "\\left( 5, \\frac{3 \\pi}{2} \\right)"),
    ]
    assert rows[0]["problem"] == "What is $3 + 4 \\cdot 2$?"


def test_simplerl_aime24_keeps_the_answer_column_as_written():
    rows, rejected = bench(name="aime24", path=fixture("aime24"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("60", "001"),
        ("61", "300"),
        ("62", "008"),
    ]
    assert rows[1]["problem"] == "A rectangle has perimeter $70$ and diagonal $25$. Find its area."


def test_simplerl_amc23_float_answers():
    rows, rejected = bench(name="amc23", path=fixture("amc23"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("amc23-test-0", "2"),
        ("amc23-test-1", "7"),
        ("amc23-test-2", "2.5"),
    ]
    assert rows[1]["problem"] == "What is the sum of the digits of $2^{10}$?"


def test_simplerl_minerva_answers_are_the_last_box_of_the_solution():
    rows, rejected = bench(name="minerva_math", path=fixture("minerva_math"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("minerva_math-test-0", "2"),
        ("minerva_math-test-1", "4e3"),
        ("minerva_math-test-2", "8"),  # not the box of the earlier subproblem in the problem
    ]
    assert rows[2]["problem"].startswith("Subproblem 0: What is $2+2$?")
    assert rows[2]["problem"].endswith("Subproblem 1: What is $4+4$?")


def test_simplerl_olympiadbench_final_answer_lists():
    rows, rejected = bench(name="olympiadbench", path=fixture("olympiadbench"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("2001", "\\frac{1}{2}"),
        ("2002", "3"),
        ("2003", "3, 4"),
    ]
    assert rows[2]["problem"] == "Find the roots of $x^{2}-7 x+12=0$."


def test_simplerl_gsm8k_answers_after_the_hashes():
    rows, rejected = bench(name="gsm8k", path=fixture("gsm8k"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("gsm8k-test-0", "26"),
        ("gsm8k-test-1", "1254"),
        ("gsm8k-test-2", "4"),
    ]
    assert rows[0]["problem"].startswith("Mia bakes 3 trays")


def test_simplerl_math_train_as_the_prompt_source():
    rows, rejected = load(type="benchmark", name="math", path=fixture("math", "train"))
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("math-train-0", "2"),
        ("math-train-1", "4"),
        ("math-train-2", "10"),
        ("math-train-3", "9\\pi"),
        ("math-train-4", "12"),
    ]
    assert rows[2]["problem"] == "Compute $\\dbinom{5}{2}$."


def test_one_odd_row_is_rejected_not_read_in_another_layout(tmp_path):
    """The layout is chosen once for the whole copy: a hub-layout row in SimpleRL-Zoo's Minerva
    copy is rejected for its missing problem, not read with the hub's columns."""
    lines = [json.loads(line) for line in Path(fixture("minerva_math")).read_text().splitlines()]
    lines.insert(1, {"question": "What is 1+1?", "answer": "2"})
    rows, rejected = bench(name="minerva_math", path=write_jsonl(tmp_path / "m.jsonl", lines))
    assert [r["answer"] for r in rows] == ["2", "4e3", "8"]
    assert reasons(rejected) == {1: "missing problem"}


def test_field_settings_override_the_columns(tmp_path):
    other = [
        {"uid": "g1", "prompt": "What is 20 + 6?", "target": 26},
        {"uid": "g2", "prompt": "What is 7 - 3?", "target": "#### 4"},
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", other)
    rows, rejected = bench(
        name="gsm8k", path=path, problem_field="prompt", answer_field="target", id_field="uid"
    )
    assert rejected == []
    assert rows == [  # a named answer column is the answer as written: no "####" reading
        {"prompt_id": "g1", "problem": "What is 20 + 6?", "answer": "26"},
        {"prompt_id": "g2", "problem": "What is 7 - 3?", "answer": "#### 4"},
    ]

    # AIME24's worked solutions instead of its answer column: the last box, or a rejection.
    rows, rejected = bench(name="aime24", path=fixture("aime24"), solution_field="solution")
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [("60", "1"), ("62", "008")]
    assert [(r["prompt_id"], r["reason"]) for r in rejected] == [("61", "no final answer found")]


def test_joined_splits_of_a_local_folder_keep_their_own_ids():
    rows, rejected = load(
        type="benchmark", name="math", path=str(FIXTURES / "math"), split="train+test",
        levels=[3, 4, 5],
    )  # fmt: skip
    assert rejected == []
    assert [(r["prompt_id"], r["answer"]) for r in rows] == [
        ("math-train-1", "4"),
        ("math-train-2", "10"),
        ("math-train-4", "12"),
        ("math-test-1", "12"),
        ("math-test-2", "7"),
    ]
    test_only, _ = load(type="benchmark", name="math", path=str(FIXTURES / "math"), split="test")
    assert [r["prompt_id"] for r in test_only] == ["math-test-0", "math-test-1", "math-test-2"]
    with pytest.raises(ConfigError, match="prompts.source.path: .*one file"):
        load(type="benchmark", name="math", path=fixture("math", "train"), split="train+test")


def test_exclude_leaves_out_the_problems_of_other_benchmarks(caplog):
    """SimpleRL-Zoo's training set: MATH levels 3-5 of train and test, less MATH-500's problems
    (matched whatever their spacing or case)."""
    with caplog.at_level(logging.INFO, logger="w2sr.data.sources"):
        rows, rejected = load(
            type="benchmark", name="math", path=str(FIXTURES / "math"), split="train+test",
            levels=[3, 4, 5], exclude=[{"name": "math500", "path": fixture("math500")}],
        )  # fmt: skip
    assert rejected == []
    assert [r["prompt_id"] for r in rows] == [
        "math-train-1",
        "math-train-2",
        "math-train-4",
        "math-test-2",
    ]
    assert "math: left out 1 problems that are also in math500" in caplog.messages


def test_an_unreachable_hub_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ConfigError) as caught:
        bench(name="math500")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("benchmark math500: no local copy and the hub is unreachable (")
    assert message.endswith("download it and set its `path` (eval.benchmarks[].path)")
    assert "HuggingFaceH4/MATH-500" in message

    for source, key in [
        ({"type": "benchmark", "name": "math"}, "set its `path` (prompts.source.path)"),
        ({"type": "hf", "path": "some-org/some-set"}, "set `prompts.source.path`"),
        (
            {"type": "benchmark", "name": "math", "path": fixture("math", "train"),
             "exclude": ["math500"]},
            "set its `path` (prompts.source.exclude[].path)",
        ),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match="the hub is unreachable") as caught:
            load(**source)
        assert key in str(caught.value) and "\n" not in str(caught.value)
