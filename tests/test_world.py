"""The k-hop world: its questions, solutions and tokenizer (the models are built by the demo)."""

from __future__ import annotations

from w2sr.config import PromptsConfig
from w2sr.data.sources import load_benchmark, load_prompts
from w2sr.data.world import World, build_tokenizer, prompt_rows, solution
from w2sr.grading import GRADERS


def test_the_world_is_fixed_and_its_held_out_pairs_never_train():
    world = World()
    assert world.f == World().f and len(world.f) == world.num_symbols
    train, heldout = world.pairs("train"), world.pairs("heldout")
    assert len(heldout) == world.heldout_pairs
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == world.num_symbols * len(world.hops)


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
    rows, rejected = load_prompts(PromptsConfig(source={"type": "khop", "split": "train"}))
    bench, _ = load_benchmark("khop")
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
