"""The k-hop lookup world: a small world where weak-to-strong reasoning shows on a CPU.

A random permutation f of N symbols; a question asks for f applied k times to x
("Q k3 s5", answer "s2"). A solution writes each hop exactly like a fact ("F s5 = s9 ; F s9 = s1
; F s1 = s2 ; #### s2"), so a student that knows the facts can use them inside a solution.

The multi-hop (x, k) pairs (k = 3, 4, 5) fall into three disjoint sets:
- `heldout`: the benchmark; in no pretraining, trace or RL prompt;
- `latent`: questions the base student saw in pretraining, mostly with direct answers and some
  with whole solutions: the latent, low-probability ability to chain that RL can elicit (as
  Qwen2.5-Math has in the paper);
- `train`: the study's prompts (teacher traces, GRPO), never in the student's pretraining: on its
  own pretraining pairs the student answers everything already and RL has no gradient.

The world's built-in models (`builtin:khop-*`, pretrained by `w2sr.world_models`) stand in for
what a user would download from a hub. The world is fixed (128 symbols, seed 0) so prompts and
built-in models always agree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

NUM_SYMBOLS = 128
HOPS = (3, 4, 5)  # the multi-hop questions: prompts and benchmark
SHORT_HOPS = (1, 2)  # questions every model was shown with answers
HELDOUT_PAIRS = 96
LATENT_PAIRS = 144
SEED = 0
MARKERS = ["<pad>", "<unk>", "<eos>", "Q", "F", "=", ";", ":", "####"]
SPLITS = ("heldout", "latent", "train")


@dataclass(frozen=True)
class World:
    num_symbols: int = NUM_SYMBOLS
    seed: int = SEED
    hops: tuple[int, ...] = HOPS
    heldout_pairs: int = HELDOUT_PAIRS
    latent_pairs: int = LATENT_PAIRS
    f: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        # A permutation: every answer is equally likely, so a guess is right 1 time in N and a
        # wrong hop cannot land on the right answer by falling into a common cycle.
        f = list(range(self.num_symbols))
        random.Random(self.seed).shuffle(f)
        object.__setattr__(self, "f", tuple(f))

    @cached_property
    def _split_of(self) -> dict[tuple[int, int], str]:
        pairs = [(x, k) for k in self.hops for x in range(self.num_symbols)]
        random.Random(self.seed + 1).shuffle(pairs)
        edge = self.heldout_pairs + self.latent_pairs
        return {
            p: "heldout" if i < self.heldout_pairs else "latent" if i < edge else "train"
            for i, p in enumerate(pairs)
        }

    def apply(self, x: int, k: int) -> int:
        for _ in range(k):
            x = self.f[x]
        return x

    def pairs(self, split: str) -> list[tuple[int, int]]:
        """The multi-hop (x, k) questions of one split (see the module's docstring)."""
        return [p for p, s in self._split_of.items() if s == split]

    def short_pairs(self) -> list[tuple[int, int]]:
        return [(x, k) for k in SHORT_HOPS for x in range(self.num_symbols)]

    def vocab(self) -> list[str]:
        hops = [f"k{k}" for k in range(1, max(self.hops) + 1)]
        return MARKERS + hops + [f"s{i}" for i in range(self.num_symbols)]


def question(x: int, k: int) -> str:
    return f"Q k{k} s{x}"


def fact(x: int, y: int) -> str:
    return f"F s{x} = s{y} ;"


def walk(world: World, x: int, k: int) -> str:
    """k facts, each starting where the one before ended: "F s5 = s9 ; F s9 = s1 ;"."""
    steps = []
    for _ in range(k):
        steps.append(fact(x, world.f[x]))
        x = world.f[x]
    return " ".join(steps)


def solution(world: World, x: int, k: int) -> str:
    return f"{walk(world, x, k)} #### s{world.apply(x, k)}"


def direct(world: World, x: int, k: int) -> str:
    return f"#### s{world.apply(x, k)}"


def prompt_rows(split: str, world: World | None = None) -> list[dict]:
    """The world's questions as prompt rows (prompt_id, problem, answer)."""
    world = world or World()
    return [
        {"prompt_id": f"khop-{k}-{x}", "problem": question(x, k), "answer": f"s{world.apply(x, k)}"}
        for x, k in world.pairs(split)
    ]
