"""The k-hop lookup world: a small world where weak-to-strong reasoning shows on a CPU.

A random function f maps N symbols to symbols; a question asks for f applied k times to x
("Q k3 s5", answer "s2"). Two models stand in for what a user would download from a hub:

- the *weak teacher* (1 layer, 64 wide) learned hop-by-hop solutions ("F s5 = s9 ; F s9 = s1 ;
  F s1 = s2 ; #### s2") but gets about one fact in ten inside them wrong: 52% of the held-out
  questions right;
- the *strong student* (3 layers, 128 wide) knows every fact ("F x = y") but was only ever shown
  1- and 2-hop questions with direct answers, so it guesses multi-hop answers: 9% right.

Each solution step is written exactly like a fact, so a student fine-tuned on the teacher's
traces can use its own knowledge inside them: the pattern of the paper (the student beats its
teacher; correct-only traces help most; even incorrect ones help) appears in minutes.

The world is fixed (64 symbols, seed 0) so prompts and built-in models always agree; held-out
(x, k) pairs never appear in any pretraining or trace prompt. The models are pretrained here with
a plain PyTorch loop: they are the world's fixture, not a stage of the recipe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

NUM_SYMBOLS = 64
HOPS = (3, 4, 5)  # the multi-hop questions: prompts and benchmark
HELDOUT_PAIRS = 96
SEED = 0
MARKERS = ["<pad>", "<unk>", "<eos>", "Q", "F", "=", ";", ":", "####"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
    "{% else %}{{ m['content'] }} :{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class World:
    num_symbols: int = NUM_SYMBOLS
    seed: int = SEED
    hops: tuple[int, ...] = HOPS
    heldout_pairs: int = HELDOUT_PAIRS
    f: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        object.__setattr__(
            self, "f", tuple(rng.randrange(self.num_symbols) for _ in range(self.num_symbols))
        )

    @cached_property
    def heldout(self) -> frozenset[tuple[int, int]]:
        pairs = [(x, k) for k in self.hops for x in range(self.num_symbols)]
        return frozenset(random.Random(self.seed + 1).sample(pairs, self.heldout_pairs))

    def apply(self, x: int, k: int) -> int:
        for _ in range(k):
            x = self.f[x]
        return x

    def pairs(self, split: str) -> list[tuple[int, int]]:
        """Multi-hop (x, k) questions: `heldout` for evaluation, `train` for everything else."""
        every = [(x, k) for k in self.hops for x in range(self.num_symbols)]
        return [p for p in every if (p in self.heldout) == (split == "heldout")]

    def vocab(self) -> list[str]:
        hops = [f"k{k}" for k in range(1, max(self.hops) + 1)]
        return MARKERS + hops + [f"s{i}" for i in range(self.num_symbols)]


def question(x: int, k: int) -> str:
    return f"Q k{k} s{x}"


def fact(x: int, y: int) -> str:
    return f"F s{x} = s{y} ;"


def solution(world: World, x: int, k: int) -> str:
    steps = []
    for _ in range(k):
        y = world.f[x]
        steps.append(fact(x, y))
        x = y
    return " ".join([*steps, f"#### s{x}"])


def prompt_rows(split: str, world: World | None = None) -> list[dict]:
    """The world's questions as prompt rows (prompt_id, problem, answer)."""
    world = world or World()
    return [
        {"prompt_id": f"khop-{k}-{x}", "problem": question(x, k), "answer": f"s{world.apply(x, k)}"}
        for x, k in world.pairs(split)
    ]


# --- the world's models ------------------------------------------------------------------------


def build_tokenizer(world: World):
    """One word-level token per symbol and marker, so a step "F s5 = s9 ;" is five tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(world.vocab())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        chat_template=CHAT_TEMPLATE,
    )


def _examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) with the loss on the target only."""
    out = []
    for prefix, target in pairs:
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        tail = tokenizer(target, add_special_tokens=False)["input_ids"]
        out.append((head + tail, [-100] * len(head) + tail))
    return out


def pretrain(model, tokenizer, pairs: list[tuple[str, str]], *, steps: int, lr: float, seed: int):
    """A plain next-token loop over (prefix, target) pairs, batches of 32, cosine schedule."""
    import torch

    examples = _examples(tokenizer, pairs)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.05, anneal_strategy="cos"
    )
    model.train()
    for _ in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(32)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, (x, y) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
        loss = model(
            input_ids=ids, attention_mask=(labels != -100) | (ids != 0), labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def _new_model(tokenizer, *, hidden: int, layers: int, heads: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _save(model, tokenizer, out_dir: Path) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_teacher(out_dir: str | Path, world: World | None = None) -> Path:
    """The weak reasoner: hop-by-hop solutions for every non-held-out question of 1 to 5 hops."""
    world = world or World()
    tokenizer = build_tokenizer(world)
    model = _new_model(tokenizer, hidden=64, layers=1, heads=1, seed=world.seed)
    pairs = [
        (question(x, k) + " :", solution(world, x, k) + " <eos>")
        for k in range(1, max(world.hops) + 1)
        for x in range(world.num_symbols)
        if (x, k) not in world.heldout
    ]
    # 150 steps leave about half the held-out questions right: a weak but real reasoner.
    pretrain(model, tokenizer, pairs, steps=150, lr=2e-3, seed=world.seed)
    return _save(model, tokenizer, Path(out_dir))


def build_direct_teacher(out_dir: str | Path, world: World | None = None) -> Path:
    """A larger non-reasoner (the student's size): it memorised the direct answer of every
    non-held-out question of 1 to 5 hops, so it answers the training prompts well and writes no
    reasoning a student could learn from; held out, it guesses."""
    world = world or World()
    tokenizer = build_tokenizer(world)
    model = _new_model(tokenizer, hidden=128, layers=3, heads=2, seed=world.seed + 2)
    pairs = [
        (question(x, k) + " :", f"#### s{world.apply(x, k)} <eos>")
        for k in range(1, max(world.hops) + 1)
        for x in range(world.num_symbols)
        if (x, k) not in world.heldout
    ]
    pretrain(model, tokenizer, pairs, steps=400, lr=1e-3, seed=world.seed)
    return _save(model, tokenizer, Path(out_dir))


def build_student(out_dir: str | Path, world: World | None = None) -> Path:
    """The strong base: every fact, and direct answers to 1- and 2-hop questions only."""
    world = world or World()
    tokenizer = build_tokenizer(world)
    model = _new_model(tokenizer, hidden=128, layers=3, heads=2, seed=world.seed + 1)
    facts = [(f"F s{x} =", f"s{world.f[x]} ;") for x in range(world.num_symbols)]
    direct = [
        (question(x, k) + " :", f"#### s{world.apply(x, k)} <eos>")
        for k in (1, 2)
        for x in range(world.num_symbols)
    ]
    # Facts make half the data whatever the table's size.
    pairs = facts * max(1, len(direct) // len(facts)) + direct
    pretrain(model, tokenizer, pairs, steps=300, lr=1e-3, seed=world.seed)
    return _save(model, tokenizer, Path(out_dir))
