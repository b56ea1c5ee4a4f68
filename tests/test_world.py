"""The k-hop world: its questions, solutions and tokenizer, and the properties its built-in
models are built to have (the slow tests build them and ask them with transformers)."""

from __future__ import annotations

import re

import pytest

from w2sr.config import EvalBenchmark, PromptsConfig
from w2sr.data.sources import load_benchmark, load_training_problems
from w2sr.data.world import SPLITS, World, prompt_rows, question, solution
from w2sr.grading import GRADERS
from w2sr.models import ModelSpec
from w2sr.world_models import MODELS, build_tokenizer, training_pairs


def test_the_world_is_fixed_and_its_splits_are_disjoint():
    world = World()
    assert world.f == World().f and len(world.f) == world.num_symbols
    splits = {name: set(world.pairs(name)) for name in SPLITS}
    assert [len(splits[name]) for name in SPLITS] == [96, 144, 144]
    assert not splits["heldout"] & splits["latent"] and not splits["latent"] & splits["train"]
    assert not splits["heldout"] & splits["train"]
    assert sum(map(len, splits.values())) == world.num_symbols * len(world.hops)


def test_no_model_is_shown_a_held_out_question_and_the_student_no_study_question():
    world = World()
    heldout, study = (
        {question(x, k) + " :" for x, k in world.pairs(split)} for split in ("heldout", "train")
    )
    for name, recipe in MODELS.items():
        prompts = {prompt for prompt, _ in training_pairs(world, recipe.data)}
        assert not prompts & heldout, name
        assert bool(prompts & study) == (recipe.data != "student"), name
    shown = training_pairs(world, "student")
    latent = {question(x, k) + " :" for x, k in world.pairs("latent")}
    solutions = [target.startswith("F") for prompt, target in shown if prompt in latent]
    assert 0.15 < sum(solutions) / len(solutions) < 0.25  # SOLUTION_SHARE of the latent answers
    short = {question(x, k) + " :" for x, k in world.short_pairs()}
    worked = [target.startswith("F") for prompt, target in shown if prompt in short]
    assert 0.4 < sum(worked) / len(worked) < 0.6  # SHORT_SOLUTION_SHARE of the 1-2 hop answers


def test_a_solution_chains_facts_and_ends_with_the_answer():
    world = World()
    x, k = 5, 4
    steps = solution(world, x, k).split(" ; ")
    assert len(steps) == k + 1
    for step in steps[:-1]:
        _, a, _, b = step.removesuffix(" ;").split()
        assert world.f[int(a[1:])] == int(b[1:])
    assert steps[-1] == f"#### s{world.apply(x, k)}"
    assert GRADERS["exact"](solution(world, x, k), f"s{world.apply(x, k)}")


def test_prompt_sources_and_the_benchmark_agree_with_the_world():
    world = World()
    rows, rejected = load_training_problems(
        PromptsConfig(source={"type": "khop", "split": "train"})
    )
    bench, _ = load_benchmark(EvalBenchmark(name="khop"))
    assert not rejected
    assert {r["prompt_id"] for r in rows}.isdisjoint({r["prompt_id"] for r in bench})
    assert bench == prompt_rows("heldout")
    for row in rows + bench:
        _, hops, symbol = row["problem"].split()
        assert row["answer"] == f"s{world.apply(int(symbol[1:]), int(hops[1:]))}"


def test_the_tokenizer_keeps_one_token_per_word_and_the_chat_prefix():
    world = World()
    tokenizer = build_tokenizer(world)
    text = solution(world, 3, 5)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "Q k3 s3"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": text}], tokenize=False
    )
    assert full.startswith(prompt) and full.endswith("<eos>")


@pytest.fixture(scope="module")
def models():
    """Every built-in model of the world, as `builtin:` specs resolve them (built once, cached,
    and shared with the reduced demo)."""
    return {name: ModelSpec.parse(f"builtin:{name}").local() for name in MODELS}


def answers(path, split: str, *, samples: int = 0) -> list[tuple[tuple[int, int], str]]:
    """The model's responses to one split's questions: greedy, or `samples` each at T = 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pairs = World().pairs(split)
    chats = [[{"role": "user", "content": question(x, k)}] for x, k in pairs]
    prompts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=40,
            do_sample=bool(samples),
            temperature=1.0 if samples else None,
            top_p=None,
            top_k=None,
            num_return_sequences=max(samples, 1),
        )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [(pairs[i // max(samples, 1)], text.strip()) for i, text in enumerate(texts)]


def right(world: World, pair: tuple[int, int], response: str) -> bool:
    return response.split("####")[-1].strip() == f"s{world.apply(*pair)}"


def facts(response: str) -> list[tuple[int, int]]:
    """The facts a response states, "F sX = sY ;" as (X, Y)."""
    found = re.findall(r"(?:^|; )F s(\d+) = s(\d+)(?= ;)", response)
    return [(int(x), int(y)) for x, y in found]


@pytest.mark.slow
def test_the_small_reasoner_gets_about_one_fact_in_ten_wrong(models):
    world = World()
    said = answers(models["khop-teacher"], "heldout")
    written = [fact for _, text in said for fact in facts(text)]
    wrong = sum(world.f[x] != y for x, y in written) / len(written)
    assert 0.05 < wrong < 0.2, wrong


@pytest.mark.slow
def test_reasoners_are_more_accurate_the_larger_they_are(models):
    world = World()
    accuracy = {
        name: sum(right(world, p, t) for p, t in answers(models[name], "train")) / 144
        for name in ("khop-teacher", "khop-teacher-m", "khop-teacher-l")
    }
    assert 0.5 < accuracy["khop-teacher"] < 0.85, accuracy
    assert accuracy["khop-teacher"] < accuracy["khop-teacher-m"] <= accuracy["khop-teacher-l"]


@pytest.mark.slow
def test_the_non_reasoner_answers_directly_and_beats_the_small_reasoner_on_the_study(models):
    world = World()
    direct = answers(models["khop-direct"], "train")
    assert all(text.startswith("#### ") and "F" not in text.split() for _, text in direct)
    ahead = sum(right(world, p, t) for p, t in direct)
    small = sum(right(world, p, t) for p, t in answers(models["khop-teacher"], "train"))
    # Clearly ahead: 20 of the 144 questions. Builds on different machines differ by a few answers
    # (140 and 133 of 144 seen for the non-reasoner; 104 for the small reasoner).
    assert ahead > small + 20, (ahead, small)


@pytest.mark.slow
def test_the_base_student_chains_rarely_and_rightly_when_it_does(models):
    world = World()
    student = models["khop-student"]
    greedy = answers(student, "train")
    assert sum(text.startswith("F") for _, text in greedy) < 0.05 * len(greedy)
    sampled = answers(student, "train", samples=8)
    chains = [(p, t) for p, t in sampled if t.startswith("F")]
    assert 0.03 * len(sampled) < len(chains) < 0.3 * len(sampled), len(chains)
    # what RL can find: whole solutions, every fact right, in the student's own samples
    assert sum(right(world, p, t) and len(facts(t)) == p[1] for p, t in chains) > 20


def test_a_world_model_is_cached_under_the_digest_of_the_sources_that_build_it():
    """The pretraining loop and the world it reads both decide the weights."""
    import hashlib
    from pathlib import Path

    from w2sr import world_models
    from w2sr.data import world
    from w2sr.models import _builtin_folder

    digest = hashlib.sha256(b"khop-student")
    for module in (world_models, world):
        digest.update(Path(module.__file__).read_bytes())
    folder = _builtin_folder("khop-student")
    assert folder.parts[-2:] == ("khop-student", digest.hexdigest()[:16])
