"""The k-hop world's built-in models (`builtin:khop-*`): each pretrained with a plain PyTorch loop
on what it was shown of the world (`w2sr.data.world`). They are the world's fixture, not a stage
of the recipe, and stand in for what a user would download from a hub (see MODELS):
- the *base student* (3 layers, 128 wide) read the table as walks of facts and was shown 1-2 hop
  questions, half answered directly and half worked out fact by fact; asked a multi-hop one it
  mostly guesses (a few % right), and starts a solution in about one sample in six at
  temperature 1;
- *reasoner teachers* of three sizes learned hop-by-hop solutions but get some of the facts
  inside them wrong, fewer the larger they are: the small one (1 layer, 64 wide) about one in
  ten on held-out questions, so it answers about 60% of them right;
- a larger *non-reasoner* memorised the direct answer of every question it was shown: it is
  right on the study's prompts more often than the small reasoner, writes no reasoning, and
  guesses held out.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from w2sr.data import world as world_module
from w2sr.data.world import World, direct, question, solution, walk

SOLUTION_SHARE = 0.2  # of the base student's latent questions, shown with a whole solution
SHORT_SOLUTION_SHARE = 0.5  # of its 1-2 hop questions, shown with their facts written out
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
    "{% else %}{{ m['content'] }} :{% endif %}{% endfor %}"
)
# The modules whose source decides these models' weights: this one and the world's.
SOURCES: tuple[ModuleType, ...] = (sys.modules[__name__], world_module)


@dataclass(frozen=True)
class Recipe:
    """One built-in model of the world: its shape and what it was shown."""

    hidden: int
    layers: int
    heads: int
    data: str  # "student", "solutions" or "direct"
    steps: int = 150
    lr: float = 2e-3
    seed: int = 0


MODELS: dict[str, Recipe] = {
    "khop-student": Recipe(
        hidden=128, layers=3, heads=2, data="student", steps=600, lr=1e-3, seed=1
    ),
    # Reasoners of three sizes (vLLM's CPU attention needs heads 64 wide), trained alike.
    "khop-teacher": Recipe(hidden=64, layers=1, heads=1, data="solutions"),
    "khop-teacher-m": Recipe(hidden=128, layers=1, heads=2, data="solutions"),
    "khop-teacher-l": Recipe(hidden=128, layers=2, heads=2, data="solutions"),
    "khop-direct": Recipe(
        hidden=128, layers=3, heads=2, data="direct", steps=1500, lr=2e-3, seed=2
    ),
}


def _asked(x: int, k: int) -> str:
    return question(x, k) + " :"


def training_pairs(world: World, data: str) -> list[tuple[str, str]]:
    """(prompt, target) pairs a built-in model is pretrained on, with repeats as weights."""
    short = world.short_pairs()
    if data == "student":
        rng = random.Random(world.seed + 2)
        # The table read as walks of one to six facts from every symbol: the student can
        # follow a chain of facts, though no question ever asked it to.
        facts = [
            ("", walk(world, x, rng.randint(1, 6)))
            for _ in range(3)
            for x in range(world.num_symbols)
        ]
        # Half the short questions worked out: the student has seen a solution open with the
        # fact about the question's own symbol. With direct answers only, its chains start one
        # hop late (the first fact about f(x)) and every fine-tune inherits that.
        worked = random.Random(world.seed + 3)
        answers = []
        for x, k in short:
            form = solution if worked.random() < SHORT_SOLUTION_SHARE else direct
            answers.append((_asked(x, k), form(world, x, k)))
        latent = world.pairs("latent")
        shown = [
            (_asked(x, k), (solution if rng.random() < SOLUTION_SHARE else direct)(world, x, k))
            for _ in range(5)
            for x, k in latent
        ]
        return facts + answers + shown
    seen = world.pairs("latent") + world.pairs("train")
    if data == "direct":  # answers only: no fact on its own, so nothing to chain held out
        return [(_asked(x, k), direct(world, x, k)) for x, k in seen]
    return [(_asked(x, k), solution(world, x, k)) for x, k in short + seen]


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
    """(input ids, labels) with the loss on the target and its end only."""
    out = []
    for prefix, target in pairs:
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        tail = tokenizer(target, add_special_tokens=False)["input_ids"]
        if prefix.endswith(":"):  # a question: the answer ends the turn
            tail = [*tail, tokenizer.eos_token_id]
        out.append((head + tail, [-100] * len(head) + tail))
    return out


def pretrain(model, tokenizer, pairs, *, steps: int, lr: float, seed: int, batch: int = 64):
    """A plain next-token loop over (prefix, target) pairs with a cosine schedule."""
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
        rows = [examples[rng.randrange(len(examples))] for _ in range(batch)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (x, y) in enumerate(rows):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def _new_model(tokenizer, recipe: Recipe, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.hidden * 4,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build(name: str, out_dir: str | Path, world: World | None = None) -> Path:
    """Pretrain the built-in model `name` of MODELS and save it as a Hugging Face folder."""
    world = world or World()
    recipe = MODELS[name]
    tokenizer = build_tokenizer(world)
    model = _new_model(tokenizer, recipe, seed=world.seed + recipe.seed)
    pairs = training_pairs(world, recipe.data)
    pretrain(model, tokenizer, pairs, steps=recipe.steps, lr=recipe.lr, seed=world.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
