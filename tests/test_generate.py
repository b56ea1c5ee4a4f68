"""Trace generation end to end: real vLLM engines on Ray Data, a tiny local model, a local Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from faults import kill_when
from ray.exceptions import ActorDiedError

from w2sr import layout, lineage
from w2sr.config import ConfigError, validate
from w2sr.data.prompt_set import RENDER_ROWS, prepare_prompts, write_prompt_set
from w2sr.data.prompts import load_tokenizer
from w2sr.data.templates import TEMPLATES, reasoning_prefill
from w2sr.grading import extract_answer, is_correct
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir
from w2sr.schemas import TRACE_SCHEMA
from w2sr.stages.generate import _trace_row, generate
from w2sr.stages.select import match_sizes, select, select_variant

# Long enough that one engine step cannot prefill every prompt at once: a prompt gets split or
# deferred, the path where seeded sampling on CPU used to kill the engine.
STORY = "A merchant sells apples, then counts the coins twice to verify the total. " * 4
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 4)]
PROBLEMS = [f"{STORY}What is {a} + {b}?" for a, b in PAIRS]
SAMPLES = 3


def write_prompts(path: Path) -> None:
    lines = [
        json.dumps({"id": f"p{i}", "question": q, "gold": str(i)}) for i, q in enumerate(PROBLEMS)
    ]
    lines += [
        json.dumps({"id": "no-answer", "question": "What is 1 + 1?"}),
        json.dumps({"id": "empty", "question": "  ", "gold": "2"}),
        "{not json",
        json.dumps({"id": "too-long", "question": "1 + " * 400 + "1", "gold": "401"}),
    ]
    path.write_text("\n".join(lines) + "\n")


def experiment(tmp: Path, model: str) -> dict:
    write_prompts(tmp / "prompts.jsonl")
    return {
        "run_dir": str(tmp / "run"),
        "teacher": model,
        "prompts": {
            "source": {
                "type": "file",
                "path": str(tmp / "prompts.jsonl"),
                "problem_field": "question",
                "answer_field": "gold",
                "id_field": "id",
            }
        },
        "generation": {
            "samples_per_prompt": SAMPLES,
            "prompts_per_shard": 3,
            "sampling": {"max_tokens": 24, "temperature": 1.0},
            "engine": {"batch_size": 32, "max_model_len": 512},
        },
    }


def read_traces(cfg):
    return layout.read_traces(RunDir(cfg.run_dir), Lineage(cfg).traces.folder)


def traces_dir(cfg) -> Path:
    return Path(cfg.run_dir, Lineage(cfg).traces.folder)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_model, ray_session):
    data = experiment(tmp_path_factory.mktemp("gen"), tiny_model)
    cfg = validate(data)
    return cfg, generate(cfg)


def test_traces_have_the_schema_and_one_row_per_prompt_and_sample(generated):
    cfg, record = generated
    run = RunDir(cfg.run_dir)
    traces = read_traces(cfg)
    assert traces.schema == TRACE_SCHEMA
    assert traces.num_rows == len(PROBLEMS) * SAMPLES == record["traces"]
    pairs = set(
        zip(traces["prompt_id"].to_pylist(), traces["sample_index"].to_pylist(), strict=True)
    )
    assert pairs == {(f"p{i}", k) for i in range(len(PROBLEMS)) for k in range(SAMPLES)}
    assert len(set(traces["seed"].to_pylist())) == traces.num_rows
    shards = run.list(Lineage(cfg).traces.folder, suffix=".parquet")
    assert shards == [f"shard-{i:05d}.parquet" for i in range(3)]
    assert run.list(Lineage(cfg).traces.folder, layout.PARTS) == []  # every part sealed


def test_every_trace_is_graded_and_counted(generated):
    cfg, _ = generated
    for row in read_traces(cfg).to_pylist():
        assert row["correct"] == is_correct(row["trace"], row["answer"])
        assert row["teacher"] == cfg.teacher
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["problem"] in row["prompt"]
        assert row["prompt_tokens"] > 100
        assert 0 < row["completion_tokens"] <= 24
        expected = "length" if row["completion_tokens"] == 24 else "stop"
        assert row["finish_reason"] == expected


def test_malformed_and_too_long_prompts_are_set_aside_with_reasons(generated):
    cfg, _ = generated
    run = RunDir(cfg.run_dir)
    source = run.read_parquet(Lineage(cfg).problems.folder, "rejected.parquet").to_pylist()
    too_long = run.read_parquet(Lineage(cfg).prompts.folder, "rejected.parquet").to_pylist()
    rejected = source + too_long
    reasons = {row["prompt_id"]: row["reason"] for row in rejected}
    assert len(source) == 3 and [r["prompt_id"] for r in too_long] == ["too-long"]
    assert "answer" in reasons["no-answer"]
    assert "problem" in reasons["empty"]
    assert "max_model_len" in reasons["too-long"]
    assert any("JSON" in r["reason"] for r in rejected if r["prompt_id"] is None)


def test_the_prompt_set_rendered_in_batches_is_the_prompt_set_rendered_at_once(
    tmp_path, tiny_model
):
    sets = []
    for batch_rows in (2, RENDER_ROWS):
        (tmp_path / str(batch_rows)).mkdir()
        cfg = validate(experiment(tmp_path / str(batch_rows), tiny_model))
        run = RunDir(cfg.run_dir)
        write_prompt_set(cfg, run, Lineage(cfg).prompts, Lineage(cfg).problems, batch_rows)
        folder = Lineage(cfg).prompts.folder
        sets.append(
            (
                run.read_parquet(folder, layout.PROMPT_SET),
                run.read_parquet(folder, "rejected.parquet"),
            )
        )
        assert run.done(folder, Lineage(cfg).prompts.fingerprint)["prompts"] == len(PROBLEMS)
    (batched, batched_rejected), (whole, whole_rejected) = sets
    assert batched.equals(whole) and batched_rejected.equals(whole_rejected)
    assert batched["prompt_id"].to_pylist() == [f"p{i}" for i in range(len(PROBLEMS))]
    assert batched["shard"].to_pylist() == [i // 3 for i in range(len(PROBLEMS))]
    # the 8th problem: its index is its place in the problem set, not in its batch
    assert [(r["index"], r["prompt_id"]) for r in batched_rejected.to_pylist()] == [(7, "too-long")]


def test_the_prompt_set_is_written_where_the_driver_fingerprinted_it(tmp_path, tiny_model):
    """The writer runs in a Ray task, on a node that may resolve the teacher or the source to
    other fingerprints than the driver (another hub cache): it writes the artifacts it is given,
    and the driver finds the prompts where it looks."""
    cfg = validate(experiment(tmp_path, tiny_model))
    run = RunDir(cfg.run_dir)
    problems = lineage.Artifact(layout.problems("driver-problems"), "driver-problems")
    prompts = lineage.Artifact(layout.prompts("driver-prompts"), "driver-prompts")

    write_prompt_set(cfg, run, prompts, problems)

    assert run.done(problems.folder, problems.fingerprint)["problems"] == len(PROBLEMS) + 1
    assert run.done(prompts.folder, prompts.fingerprint)["prompts"] == len(PROBLEMS)
    assert run.read_parquet(prompts.folder, layout.PROMPT_SET).num_rows == len(PROBLEMS)
    assert not run.exists(Lineage(cfg).problems.folder)  # nothing where this node would look
    assert not run.exists(Lineage(cfg).prompts.folder)


@pytest.fixture(scope="module")
def tiny_thinking(tmp_path_factory) -> str:
    """A tiny reasoning model: its chat template prefills `<think>` unless thinking is off."""
    from w2sr.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "thinking", thinking=True))


def test_the_prefill_is_the_think_a_reasoning_template_opens_the_answer_with(
    tiny_model, tmp_path, monkeypatch
):
    from w2sr.models import ModelSpec

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    thinker = load_tokenizer(ModelSpec.parse("builtin:tiny-thinking").local(), False)
    plain = load_tokenizer(tiny_model, False)
    for thinking, prefill in ((None, "<think>\n"), (True, "<think>\n"), (False, "")):
        prompt = TEMPLATES["paper"].render(thinker, PROBLEMS[0], thinking)
        assert prompt.endswith("<|im_start|>assistant\n" + prefill)
        assert reasoning_prefill(prompt) == prefill
        # a template without the switch ignores it and prefills nothing
        assert reasoning_prefill(TEMPLATES["paper"].render(plain, PROBLEMS[0], thinking)) == ""
    # `<think>` and `</think>` are single tokens, kept when decoded
    ids = thinker("<think>\n1</think>2", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and thinker.decode(ids, skip_special_tokens=True) == "<think>\n1</think>2"
    # a problem that mentions the tag is not a prefill
    asked = TEMPLATES["paper"].render(thinker, "What does <think> mean?", False)
    assert reasoning_prefill(asked) == ""


def test_the_prompt_set_is_rendered_with_thinking(tmp_path, tiny_thinking):
    for thinking, ending in ((None, "assistant\n<think>\n"), (False, "assistant\n")):
        (tmp_path / str(thinking)).mkdir()
        cfg = validate(experiment(tmp_path / str(thinking), tiny_thinking) | {"thinking": thinking})
        run = RunDir(cfg.run_dir)
        write_prompt_set(cfg, run, Lineage(cfg).prompts, Lineage(cfg).problems)
        prompts = run.read_parquet(Lineage(cfg).prompts.folder, layout.PROMPT_SET)
        assert prompts.num_rows == len(PROBLEMS)
        assert all(prompt.endswith(ending) for prompt in prompts["prompt"].to_pylist())


def test_a_trace_is_the_completion_behind_the_prefilled_think(tmp_path, tiny_model):
    cfg = validate(experiment(tmp_path, tiny_model) | {"grading_policy": "standard"})
    postprocess = _trace_row(cfg)
    row = {"prompt_id": "p", "problem": "1 + 2?", "answer": "3", "sample_index": 0, "seed": 0}
    row |= {"num_input_tokens": 9, "num_generated_tokens": 5, "shard": 0}
    cases = [  # (prompt's end, completion, stored trace, extracted answer)
        ("<think>\n", "1 + 2 = 3</think> \\boxed{3}", "<think>\n1 + 2 = 3</think> \\boxed{3}", "3"),
        ("<think>\n", "1 + 2 = \\boxed{3}", "<think>\n1 + 2 = \\boxed{3}", None),  # unclosed
        ("", "1 + 2 = \\boxed{3}", "1 + 2 = \\boxed{3}", "3"),
    ]
    for end, completion, trace, answer in cases:
        prompt = "<|im_start|>assistant\n" + end
        out = postprocess(row | {"prompt": prompt, "generated_text": completion})
        assert (out["prompt"], out["trace"], out["extracted_answer"]) == (prompt, trace, answer)
        assert out["correct"] == (answer == "3")
        assert out["completion_tokens"] == 5  # what the teacher generated, not the prefill


@pytest.mark.slow
def test_a_thinking_teachers_traces_hold_its_prefilled_think(tmp_path, tiny_thinking, ray_session):
    """A reasoning teacher whose template prefills `<think>`: every stored trace starts with it
    and is graded whole, so a thought the tiny model never closed gives no answer (read alone,
    its completion would give the last number). With thinking off the template prefills nothing
    and a trace is its completion alone: `test_the_prompt_set_is_rendered_with_thinking` and
    `test_a_trace_is_the_completion_behind_the_prefilled_think`, without an engine."""
    data = experiment(tmp_path, tiny_thinking) | {"grading_policy": "standard"}
    data["generation"]["sampling"]["max_tokens"] = 64
    cfg = validate(data)
    generate(cfg)
    rows = read_traces(cfg).to_pylist()
    assert len(rows) == len(PROBLEMS) * SAMPLES
    prefill = "<think>\n"
    assert all(row["prompt"].endswith("assistant\n" + prefill) for row in rows)
    assert all(row["trace"].startswith(prefill) for row in rows)
    for row in rows:
        assert row["extracted_answer"] == extract_answer(row["trace"], "standard")
        assert row["correct"] == is_correct(row["trace"], row["answer"], "standard")
    open_thoughts = [row["trace"] for row in rows if "</think>" not in row["trace"]]
    assert open_thoughts and all(
        extract_answer(trace, "standard") is None for trace in open_thoughts
    )
    completions = [trace.removeprefix(prefill) for trace in open_thoughts]
    assert any(extract_answer(text, "standard") is not None for text in completions)


@pytest.mark.slow
def test_a_prompt_set_with_no_prompt_that_fits_fails_naming_the_key_and_writes_no_prompts(
    tmp_path, tiny_model, ray_session
):
    config = experiment(tmp_path, tiny_model)
    config["generation"]["engine"]["max_model_len"] = 8
    cfg = validate(config)
    run = RunDir(cfg.run_dir)
    with pytest.raises(ConfigError, match="generation.engine.max_model_len") as raised:
        prepare_prompts(cfg, run)  # the preparation runs in a Ray task; its error is the user's
    assert type(raised.value) is ConfigError
    folder = Lineage(cfg).prompts.folder
    assert not run.exists(folder, layout.PROMPT_SET) and not run.done(
        folder, Lineage(cfg).prompts.fingerprint
    )
    assert run.read_parquet(folder, "rejected.parquet").num_rows == len(PROBLEMS) + 1


def test_rerun_with_the_same_config_does_nothing(generated):
    cfg, record = generated
    before = {p.name: p.stat().st_mtime_ns for p in traces_dir(cfg).glob("*.parquet")}
    assert generate(cfg) == record
    after = {p.name: p.stat().st_mtime_ns for p in traces_dir(cfg).glob("*.parquet")}
    assert before == after


def test_selection_splits_traces_into_the_three_training_sets(generated):
    cfg, _ = generated
    summary = select(cfg)
    run = RunDir(cfg.run_dir)
    sets = Lineage(cfg).sft.folder
    every = run.read_parquet(sets, "all.parquet")
    right = run.read_parquet(sets, "correct.parquet")
    wrong = run.read_parquet(sets, "incorrect.parquet")
    assert every.num_rows == right.num_rows + wrong.num_rows == len(PROBLEMS) * SAMPLES
    assert all(right["correct"].to_pylist()) and not any(wrong["correct"].to_pylist())
    assert summary["all"]["traces"] == every.num_rows
    assert summary["all"]["truncated"] == every["finish_reason"].to_pylist().count("length")
    assert summary["all"]["completion_tokens"]["max"] <= 24
    # written shard by shard: each set is the whole table's, row for row
    traces = layout.read_traces(run, Lineage(cfg).traces.folder)
    assert len(run.list(Lineage(cfg).traces.folder, suffix=".parquet")) > 1
    for variant, table in zip(layout.VARIANTS, (every, right, wrong), strict=True):
        assert table.equals(select_variant(traces, variant))
        assert summary[variant.name]["prompts"] == len(set(table["prompt_id"].to_pylist()))


def graded_traces(correct: list[bool], tokens: list[int]) -> pa.Table:
    return pa.table({
        "prompt_id": [f"p{i}" for i in range(len(tokens))],
        "correct": correct,
        "completion_tokens": pa.array(tokens, pa.int32()),
    })  # fmt: skip


def test_matched_sets_have_one_size_in_traces_or_tokens():
    rows = 60
    rng = np.random.default_rng(1)
    table = graded_traces(list(rng.random(rows) < 0.25), list(rng.integers(1, 50, rows)))
    sets = {v.name: select_variant(table, v) for v in layout.VARIANTS}
    sizes = {name: t.num_rows for name, t in sets.items()}
    assert sizes["correct"] < sizes["incorrect"] < sizes["all"]

    by_traces = match_sizes(sets, "traces", seed=0)
    assert {t.num_rows for t in by_traces.values()} == {sizes["correct"]}
    assert by_traces["correct"].equals(sets["correct"])  # the smallest stays whole
    kept = set(by_traces["incorrect"]["prompt_id"].to_pylist())
    assert kept < set(sets["incorrect"]["prompt_id"].to_pylist())  # a subset, no repeats
    assert len(kept) == sizes["correct"]

    tokens = {name: sum(t["completion_tokens"].to_pylist()) for name, t in sets.items()}
    smallest = min(tokens, key=tokens.get)
    by_tokens = match_sizes(sets, "tokens", seed=0)
    for subset in by_tokens.values():
        total = sum(subset["completion_tokens"].to_pylist())
        assert tokens[smallest] - 50 < total <= tokens[smallest]  # within one trace of the target
    assert by_tokens[smallest].equals(sets[smallest])

    # seeded: the same seed, the same subset; another seed, another
    again = match_sizes(sets, "traces", seed=0)["incorrect"]["prompt_id"].to_pylist()
    other = match_sizes(sets, "traces", seed=1)["incorrect"]["prompt_id"].to_pylist()
    assert again == by_traces["incorrect"]["prompt_id"].to_pylist() and other != again

    # an empty set is left out of the target instead of emptying the others
    none_right = {v.name: select_variant(graded_traces([False] * 5, [3] * 5), v)
                  for v in layout.VARIANTS}  # fmt: skip
    cut = match_sizes(none_right, "traces", seed=0)
    assert [t.num_rows for t in cut.values()] == [5, 0, 5]


def test_matched_selection_writes_new_sets_beside_the_unmatched_ones(generated):
    cfg, _ = generated
    plain = select(cfg)
    matched_cfg = validate({**cfg.model_dump(), "select": {"match": "tokens"}})
    matched = select(matched_cfg)
    run = RunDir(cfg.run_dir)
    assert Lineage(matched_cfg).sft.folder != Lineage(cfg).sft.folder
    assert run.read_json(Lineage(cfg).sft.folder, layout.SFT_SUMMARY) == plain
    filled = [name for name, s in matched.items() if s["traces"]]
    target = min(matched[name]["matched"]["tokens_before"] for name in filled)
    for name in filled:
        assert matched[name]["matched"]["traces_before"] == plain[name]["traces"]
        assert matched[name]["tokens"] <= target
    # written shard by shard: each set is what matching the whole sets gives, row for row
    traces = layout.read_traces(run, Lineage(cfg).traces.folder)
    sets = {v.name: select_variant(traces, v) for v in layout.VARIANTS}
    whole = match_sizes(sets, "tokens", matched_cfg.seed)
    for name, table in whole.items():
        assert run.read_parquet(Lineage(matched_cfg).sft.folder, f"{name}.parquet").equals(table)
        table = run.read_parquet(Lineage(matched_cfg).sft.folder, f"{name}.parquet")
        assert table.num_rows == matched[name]["traces"]


@pytest.mark.slow
def test_a_killed_engine_fails_the_stage_past_its_restart_bound_and_is_replaced_within_it(
    tmp_path, tiny_model, ray_session
):
    """With `max_restarts: 0` an engine's death is not survived: the stage fails instead of
    replacing it, and the shards finished before stay. The rerun (the bound is not part of the
    fingerprint) allows restarts, and its engine actor is killed again mid-generation: Ray Data
    starts another and replays the lost batches. The finished shards stay untouched and every
    (prompt, sample) is written once."""
    data = experiment(tmp_path, tiny_model)
    data["generation"] |= {"samples_per_prompt": 16, "prompts_per_shard": 1}
    data["generation"]["sampling"]["max_tokens"] = 200
    data["generation"]["engine"] |= {"batch_size": 4, "max_restarts": 0}
    cfg = validate(data)
    traces = traces_dir(cfg)

    def sealed() -> int:
        return len(list(traces.glob("shard-*.parquet")))

    killed: list = []
    watcher = kill_when(sealed, "vLLMEngineStageUDF", killed)
    # The bound's own error: Ray declares the engine's actor dead (a restart still allowed
    # would leave it unavailable for a while, then replaced), and Ray Data stops on it.
    with pytest.raises(ActorDiedError, match="vLLMEngineStageUDF") as died:
        generate(cfg)
    watcher.join(timeout=1)
    assert killed and killed[0] < len(PROBLEMS), "the kill did not land mid-generation"
    assert not died.value.actor_init_failed  # killed at work, not failing to start
    assert not (traces / "_DONE.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in traces.glob("shard-*.parquet")}
    assert 0 < len(before) < len(PROBLEMS)

    data["generation"]["engine"]["max_restarts"] = 4
    again: list = []
    watcher = kill_when(lambda: sealed() > len(before) and sealed(), "vLLMEngineStageUDF", again)
    generate(validate(data))
    watcher.join(timeout=1)
    assert again and again[0] < len(PROBLEMS), "the second kill did not land mid-generation"
    after = {p.name: p.stat().st_mtime_ns for p in traces.glob("shard-*.parquet")}
    assert {name: after[name] for name in before} == before  # finished shards untouched
    table = read_traces(cfg)
    pairs = list(
        zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == len(PROBLEMS) * 16


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_traces(tmp_path, tiny_model, ray_session):
    """SIGKILL of the `w2sr generate` driver (and the Ray session it started) as soon as its
    first shard is sealed, with shards still to generate: the rerun keeps every sealed shard as
    it is and generates the rest, each (prompt, sample) once."""
    data = experiment(tmp_path, tiny_model)
    data["generation"] |= {"samples_per_prompt": 16, "prompts_per_shard": 1}
    data["generation"]["sampling"]["max_tokens"] = 200
    data["generation"]["engine"]["batch_size"] = 4
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    traces = traces_dir(validate(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "w2sr.cli", "generate", str(config)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(traces.glob("shard-*.parquet")) and time.time() < deadline:
            assert proc.poll() is None, "generation ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    sealed = sorted(traces.glob("shard-*.parquet"))
    assert 0 < len(sealed) < len(PROBLEMS), f"the kill did not land mid-generation: {sealed}"
    assert not (traces / "_DONE.json").exists()
    survivors = {p.name: (p.stat().st_mtime_ns, pq.read_table(p)) for p in sealed}

    generate(validate(data))
    table = read_traces(validate(data))
    pairs = list(
        zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == len(PROBLEMS) * 16
    for name, (mtime, before) in survivors.items():
        path = traces / name
        assert path.stat().st_mtime_ns == mtime and pq.read_table(path).equals(before), name


def test_run_only_one_stage_runs_that_stage_alone(generated, tmp_path, capsys):
    from w2sr.cli import main

    cfg, _ = generated
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["--json", "run", str(path), "--only", "select"]) == 0
    out = capsys.readouterr().out
    done = json.loads(out[out.index("{\n") :])  # the command's record, after any library output
    assert list(done) == ["select"] and done["select"]["all"]["traces"] == len(PROBLEMS) * SAMPLES
    assert not Path(cfg.run_dir, "eval").exists()  # nothing after it ran
    with pytest.raises(SystemExit):
        main(["run", str(path), "--only", "select", "--from", "eval"])  # one or the other


def test_replayed_rows_are_kept_once_and_each_group_is_sealed_once_whole(tmp_path, ray_session):
    """What a replaced engine leaves, through the pipeline's real part writer and sealing: Ray
    Data replays the batches the killed actor lost, so some rows arrive twice and a group's
    count reaches its size before all its keys are there. Each group is still sealed once,
    whole, every (prompt, sample) kept once, and no part is left. (The engine stage is a stand-in
    here; the real engine is killed in the generation test above, through this same code.)"""
    import ray

    from w2sr.engines.generator import Groups, generate_groups

    run = RunDir(str(tmp_path))
    rows = [
        {"group": g, "prompt_id": f"{g}-{i}", "sample_index": k}
        for g in ("a", "b")
        for i in range(6)
        for k in range(4)
    ]

    def replaying(dataset):  # the first rows of each block come again, as a replayed batch
        def engine(batch: dict) -> dict:
            again = {key: list(values) + list(values[:3]) for key, values in batch.items()}
            return again

        return dataset.map_batches(engine, batch_format="numpy", batch_size=None)

    written: dict[str, int] = {}

    def seal(group: str, kept: list[dict]) -> dict:
        run.write_parquet(pa.Table.from_pylist(kept), "out", f"{group}.parquet")
        return {"rows": len(kept)}

    groups = Groups(run, "out", "group", {"a": "parts-a", "b": "parts-b"}, {"a": 24, "b": 24}, seal)
    sealed: list[str] = []

    def record(group: str, facts: dict) -> None:
        sealed.append(group)
        written[group] = facts["rows"]

    requests = ray.data.from_items(rows, override_num_blocks=6)
    generate_groups(replaying, requests, groups, record, "")
    assert sorted(sealed) == ["a", "b"] and written == {"a": 24, "b": 24}
    for group in ("a", "b"):
        table = run.read_parquet("out", f"{group}.parquet").to_pylist()
        keys = [(r["prompt_id"], r["sample_index"]) for r in table]
        assert len(keys) == len(set(keys)) == 24
        assert not run.exists("out", f"parts-{group}")


@pytest.mark.slow
def test_a_command_prints_its_own_lines_and_keeps_the_rest_in_the_stages_log(tmp_path, tiny_model):
    """`w2sr generate` as users run it, its Ray session and engine its own: the console has a
    line as the stage starts, naming its log file, and one as it ends; the engine's and Ray's
    output is in that file."""
    data = experiment(tmp_path, tiny_model)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "w2sr.cli", "generate", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout == ""
    log = Path(data["run_dir"], "logs", Lineage(validate(data)).traces.folder.replace("/", "-"))
    log = log.with_name(log.name + ".log")
    lines = done.stderr.splitlines()
    assert lines[0] == f"generate: started (log: {log})"
    # Its progress bar: not a terminal, so its last state, with the rate.
    rate = r"[\d.]+(requests/s|s/requests)"  # tqdm's: per second, or seconds per request
    bar = rf"generate: 100%\|.+\| (\d+)/\1 \[[\d:]+<00:00, +{rate}\]"
    assert re.fullmatch(bar, lines[-2]), done.stderr
    assert re.fullmatch(r"generate: done in \d+ s", lines[-1])
    assert len(lines) <= 6, done.stderr  # and Ray's own lines before the stage, if any
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr
    text = log.read_text()
    assert "wrote traces/" in text and "vLLM" in text  # w2sr's details and the engine's output


@pytest.mark.slow
def test_a_failing_stage_shows_its_error_and_the_end_of_its_log(tmp_path, ray_session, capsys):
    """A teacher folder that no loader can read: the command exits 1, the console has the
    stage's error, its log file and the log's last lines, the traceback is in the log only."""
    from w2sr.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "tokenizer_config.json").write_text("{}")
    data = experiment(tmp_path, str(broken))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["generate", str(config)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert re.fullmatch(r"generate: failed after \d+ s: \w+: .+", lines[1]), err
    log = Path(lines[0].split("(log: ", 1)[1].rstrip(")"))
    assert lines[2] == f"  log: {log}; its last lines:"
    assert lines[3:] and all(line.startswith("  | ") for line in lines[3:])
    assert "Traceback" not in err and "Traceback" in log.read_text()
