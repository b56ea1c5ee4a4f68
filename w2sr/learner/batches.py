"""Training data: SFT samples from a trace table (tokens, loss mask, order), GRPO's rollout
batches, and the model inputs of a micro-batch for both.

A sample is the prompt exactly as generation rendered it (the template's messages through the
student's chat template, with the generation prompt) followed by its target, the trace as
`train.reasoning` has it (`sft_target`), and the text the chat template closes an assistant turn
with (`<|im_end|>` for ChatML). Only the assistant part carries loss. A trace the teacher did not
finish (`finish_reason == "length"`) gets no end-of-turn: the student should not learn to stop
mid-thought.

Order: one optimizer step takes the next `global_batch` samples of a stream made of one fresh
permutation per epoch (seeded by `(seed, epoch)`), so the data position of a step is
`step * global_batch` whatever the number of workers, and a resumed run reads the same samples.

Batches: the loss of a step is the sum of token losses over the whole global batch divided by its
number of target tokens, so how the step's samples are split into ranks and micro-batches, and
whether a micro-batch is padded or packed, does not change the gradient. Packed micro-batches put
their samples in one row with positions restarting at 0 and no attention mask, and the position
resets keep samples apart: transformers' eager and sdpa attention build a block-diagonal causal
mask from them (`masking_utils.find_packed_sequence_indices`), flash-attention reads them as
sequence boundaries, and w2sr's `learner.attention.sample_sdpa` attends each sample on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from w2sr.data.prompts import render
from w2sr.data.templates import Template, reasoning_prefill
from w2sr.grading import THINK_CLOSE, THINK_OPEN, split_reasoning

IGNORE = -100
_PROBE = "W2SR-ASSISTANT-PROBE"


def assistant_end(tokenizer) -> str:
    """The text the chat template closes an assistant message with; the eos if it adds none."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"the student tokenizer ({tokenizer.name_or_path}) has no chat template; "
            "SFT renders prompts with it exactly as generation does"
        )
    messages = [{"role": "user", "content": "?"}]
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    end = full[full.index(_PROBE) + len(_PROBE) :].rstrip() if _PROBE in full else ""
    if not end and not tokenizer.eos_token:
        raise ValueError("the student tokenizer has neither an end-of-turn marker nor an eos token")
    return end or tokenizer.eos_token


@dataclass
class SFTSet:
    """Tokenized samples as flat arrays (cheap to ship to every worker through the object store).

    Sample i is `tokens[offsets[i]:offsets[i + 1]]`; its first `prompt_lens[i]` tokens are prompt.
    """

    tokens: np.ndarray  # int32, all samples concatenated
    offsets: np.ndarray  # int64, len(samples) + 1
    prompt_lens: np.ndarray  # int32
    traces: int  # traces read
    truncated: int  # samples cut at cutoff_len
    dropped: int  # samples whose prompt alone fills cutoff_len: nothing left to learn
    unanswered: int  # `strip`: traces with no answer after their thought, left out

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def labels(self, i: int) -> np.ndarray:
        """The input ids with the prompt masked (-100): the usual causal-LM labels."""
        labels = self.ids(i).astype(np.int64)
        labels[: self.prompt_lens[i]] = IGNORE
        return labels

    def targets(self, i: int) -> np.ndarray:
        """Labels shifted left: position t predicts token t+1; the last position predicts nothing,
        so in a packed row no sample is trained to predict the next sample's first token."""
        labels = self.labels(i)
        return np.concatenate([labels[1:], [IGNORE]])

    @property
    def target_counts(self) -> np.ndarray:
        return self.lengths - self.prompt_lens


def sft_target(trace: str, reasoning: str, prefill: str) -> str | None:
    """What the student learns to write behind its prompt, from a stored trace (which holds the
    teacher's whole thought, a prefilled `<think>` included).

    `keep`: the trace. `strip`: its answer part alone (`split_reasoning`); None where there is
    none, a thought never closed or nothing after it: trained on, an empty target would teach
    the student to end its turn at once. A student whose chat template prefills `prefill` (a
    `<think>`) has it in its prompt already, so it is not learned again; a target with no thought
    (stripped, or a teacher that does not think) closes that one empty first, as Qwen3 does with
    thinking off, so that the student's response behind its prefill has an answer to read.
    """
    thought, answer = split_reasoning(trace)
    if reasoning == "strip":
        if answer is None or not answer.strip():
            return None
        trace, thought = answer, None
    if not prefill:
        return trace
    if thought is None:
        return THINK_CLOSE + trace
    if trace.startswith(prefill):
        return trace[len(prefill) :]
    head = trace.lstrip()
    if head.startswith(THINK_OPEN):  # opened with other blanks than the prefill's
        return head[len(THINK_OPEN) :].lstrip()
    return trace  # a thought whose `<think>` was not stored: the prefill opens it


def build_sft_set(
    tokenizer,
    template: Template,
    traces: pa.Table | Iterable[pa.RecordBatch],
    cutoff_len: int,
    *,
    thinking: bool | None = None,
    reasoning: str = "keep",
    batch_size: int = 1024,
) -> SFTSet:
    """Tokenize traces (columns problem, trace and optionally finish_reason), the prompts
    rendered with `thinking` and the targets made by `sft_target` under `reasoning`.

    `traces` is a table, or its record batches one after another: the stage reads a training
    set batch by batch, so that only its tokens are ever held whole."""
    end_ids = tokenizer(assistant_end(tokenizer), add_special_tokens=False)["input_ids"]
    if isinstance(traces, pa.Table):
        traces = traces.to_batches(max_chunksize=batch_size)
    chunks: list[np.ndarray] = []  # one per batch: its samples' tokens concatenated
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    rows = truncated = dropped = unanswered = 0
    for batch in traces:
        rows += batch.num_rows
        texts = batch.column("trace").to_pylist()
        finished = (
            [reason != "length" for reason in batch.column("finish_reason").to_pylist()]
            if "finish_reason" in batch.schema.names
            else [True] * len(texts)
        )
        prompts, prompt_ids = render(
            tokenizer, template, batch.column("problem").to_pylist(), thinking
        )
        targets, kept = [], []
        for prompt, p_ids, trace, done in zip(prompts, prompt_ids, texts, finished, strict=True):
            target = sft_target(trace, reasoning, reasoning_prefill(prompt))
            if target is None:
                unanswered += 1
                continue
            targets.append(target)
            kept.append((p_ids, done))
        target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if targets else []
        samples: list[list[int]] = []
        for (p_ids, done), t_ids in zip(kept, target_ids, strict=True):
            ids = p_ids + t_ids + (end_ids if done else [])
            if len(p_ids) >= min(len(ids), cutoff_len):
                dropped += 1
                continue
            if len(ids) > cutoff_len:
                ids = ids[:cutoff_len]
                truncated += 1
            samples.append(ids)
            lengths.append(len(ids))
            prompt_lengths.append(len(p_ids))
        if samples:
            chunks.append(np.fromiter(itertools.chain.from_iterable(samples), dtype=np.int32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    prompt_lens = np.asarray(prompt_lengths, dtype=np.int32)
    return SFTSet(tokens, offsets, prompt_lens, rows, truncated, dropped, unanswered)


# --- order -----------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_samples(n: int, global_batch: int, seed: int, position: int) -> np.ndarray:
    """The `global_batch` sample indices read from data position `position` of the stream."""
    taken = []
    need = global_batch
    while need:
        epoch, offset = divmod(position, n)
        chunk = epoch_permutation(n, seed, epoch)[offset : offset + need]
        taken.append(chunk)
        need -= len(chunk)
        position += len(chunk)
    return np.concatenate(taken)


def total_steps(n: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    """Steps of the run: `max_steps` when set, else every whole global batch in `epochs` epochs."""
    steps = max_steps if max_steps is not None else n * epochs // global_batch
    if steps < 1:
        raise ValueError(
            f"{n} samples x {epochs} epochs do not fill one global batch of {global_batch}"
        )
    return steps


def micro_batch_plan(
    indices: np.ndarray, lengths: np.ndarray, world: int, micro: int
) -> list[list[list]]:
    """`[rank][micro_step]` -> sample indices of one step.

    Longest first, dealt round-robin: ranks carry about the same number of tokens at each
    micro-step (they wait for each other in every collective), and a micro-batch holds samples
    of similar length (little padding).
    """
    order = sorted(indices.tolist(), key=lambda i: -int(lengths[i]))
    per_rank = [order[rank::world] for rank in range(world)]
    return [[mine[k : k + micro] for k in range(0, len(mine), micro)] for mine in per_rank]


# --- batches ---------------------------------------------------------------------------------


def model_rows(samples: list[np.ndarray], packed: bool, pad_id: int) -> tuple[dict, list[int]]:
    """The model inputs of a micro-batch, and where each sample starts in the flattened rows.

    Packed: one row holding every sample, positions restarting at 0 at each sample, no padding.
    Padded: one right-padded row per sample with an attention mask.
    """
    import torch

    lengths = [len(sample) for sample in samples]
    if packed:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        ids = np.concatenate(samples).astype(np.int64)
        positions = np.concatenate([np.arange(n) for n in lengths])
        inputs = {
            "input_ids": torch.from_numpy(ids)[None],
            "position_ids": torch.from_numpy(positions)[None],
        }
        return inputs, starts
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[row, :n] = torch.from_numpy(np.asarray(sample, dtype=np.int64))
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, [
        row * width for row in range(len(samples))
    ]


def sft_rows(data: SFTSet, indices: list[int], packed: bool, pad_id: int) -> dict:
    """SFT inputs with `targets` (the shifted labels, -100 where nothing is learned)."""
    import torch

    inputs, starts = model_rows([data.ids(i) for i in indices], packed, pad_id)
    targets = torch.full((inputs["input_ids"].numel(),), IGNORE, dtype=torch.long)
    for start, i in zip(starts, indices, strict=True):
        targets[start : start + int(data.lengths[i])] = torch.from_numpy(data.targets(i))
    return {**inputs, "targets": targets.view_as(inputs["input_ids"])}


@dataclass
class RolloutBatch:
    """One GRPO step's graded groups, as rank 0 hands them to every learner worker: sample i is
    `prompt_ids[i] + completion_ids[i]`, samples of a prompt adjacent."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float]
    rewards: list[float]
    correct: list[bool]
    answered: list[bool]  # the grader could read an answer
    truncated: list[bool]

    @property
    def lengths(self) -> np.ndarray:
        return np.array(
            [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids, strict=True)]
        )

    @property
    def response_lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completion_ids])


def rollout_rows(batch: RolloutBatch, indices: list[int], packed: bool) -> dict:
    """GRPO inputs for the samples `indices`: `response` indexes the flattened positions whose
    next token is a completion token, `targets` holds those tokens and `advantages` their sample's
    advantage. Padded rows suit sdpa and eager attention; packed rows suit flash-attention, which
    reads sample boundaries from the positions."""
    import torch

    samples = [np.asarray(batch.prompt_ids[i] + batch.completion_ids[i]) for i in indices]
    inputs, starts = model_rows(samples, packed, pad_id=0)
    response: list[int] = []
    targets: list[int] = []
    advantages: list[float] = []
    for start, i in zip(starts, indices, strict=True):
        completion = batch.completion_ids[i]
        first = start + len(batch.prompt_ids[i]) - 1
        response += range(first, first + len(completion))
        targets += completion
        advantages += [batch.advantages[i]] * len(completion)
    return {
        **inputs,
        "response": torch.tensor(response),
        "targets": torch.tensor(targets),
        "advantages": torch.tensor(advantages, dtype=torch.float32),
    }
