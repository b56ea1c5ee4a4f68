"""GRPO's step (`w2sr.learner.grpo.GRPOStep`) on one process, without Ray, vLLM or DeepSpeed: the
tiny student as the policy with a torch optimizer, and an in-process sampler as its rollout
engines.

The sampler draws each completion from three of the same length that share their first tokens,
`\\boxed{7}` (right), `\\boxed{3}` (readable, wrong) and `\\boxed{99` (cut off, unreadable), with
the probabilities the weights it was last sent give them, and grades them as the rollout engines
do (`w2sr.learner.rollouts.rollout_batch`). So what it samples follows the learner only through
the weight sync, and a step's groups depend only on (seed, step) and those weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from w2sr.config import validate
from w2sr.learner.grpo import TRACKED, GRPOStep
from w2sr.learner.rollouts import rollout_batch, step_requests

PROBLEMS = [f"What is {a} + {7 - a}?" for a in range(8)]
ANSWERS = ["\\boxed{7}", "\\boxed{3}", "\\boxed{99"]
FORMAT_REWARD = 0.1


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A one-process gloo group: the step's broadcast and all-reduce as a one-worker run has
    them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's step on a few shared cores
    yield
    torch.set_num_threads(threads)
    dist.destroy_process_group()


def config(tmp_path, student: str, **grpo):
    return validate(
        {
            "run_dir": str(tmp_path),
            "teacher": student,
            "student": student,
            "grader": "exact",
            "prompts": {"source": {"type": "file", "path": str(tmp_path / "p.jsonl")}},
            "grpo": {
                "steps": 8,
                "prompts_per_step": 4,
                "group_size": 8,
                "mini_batches": 2,
                "micro_batch_size": 8,
                "num_workers": 1,
                "kl_coef": 0.0,
                "entropy_coef": 0.0,
                "format_reward": FORMAT_REWARD,
                **grpo,
            },
        }
    )


class TorchEngine:
    """What the step asks of DeepSpeed's engine, on one process: gradients accumulate over a
    mini-batch's micro-batches, then one optimizer step with the gradient clipped."""

    def __init__(self, model, lr: float, accumulation: int, max_grad_norm: float = 1.0):
        self.module, self.device = model, torch.device("cpu")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.micro_steps, self.norm = 0, None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def parameters(self):
        return self.module.parameters()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        assert not scale_wrt_gas  # the step scales its losses itself
        loss.backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            params = list(self.module.parameters())
            self.norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> float | None:
        return self.norm


class Sampler:
    """The rollout engines in-process (a `Generator`): a copy of the policy that loads what the
    learner syncs. `calls` lists what the step asked of it, in order."""

    def __init__(self, cfg, student: str, tokenizer):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
        self.answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
        assert len({len(ids) for ids in self.answers}) == 1
        self.calls: list[str] = []
        self.evaluations: list[dict[str, float]] = []

    def probabilities(self, prompt_ids: list[int]) -> np.ndarray:
        """The policy's probability of each answer behind the prompt, among the three."""
        rows = torch.tensor([prompt_ids + ids for ids in self.answers])
        with torch.no_grad():
            logits = self.model(input_ids=rows).logits[:, len(prompt_ids) - 1 : -1].float()
        targets = rows[:, len(prompt_ids) :]
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].sum(-1)
        return torch.softmax(logp, 0).numpy().astype(np.float64)

    def sample(self, prompts: list[dict], step: int):
        self.calls.append("sample")
        g = self.cfg.grpo
        chosen, seeds = step_requests(self.cfg, prompts, step)
        groups = []
        for prompt, seed in zip(chosen, seeds, strict=True):
            p = self.probabilities(prompt["prompt_token_ids"])
            drawn = np.random.default_rng(seed).choice(len(ANSWERS), g.group_size, p=p / p.sum())
            groups.append([self._completion(int(k)) for k in drawn])
        return rollout_batch(self.cfg, chosen, groups)

    def _completion(self, k: int) -> dict:
        return {
            "token_ids": self.answers[k],
            "text": ANSWERS[k],
            "finish_reason": "length" if k == 2 else "stop",
        }

    def evaluate(self, benchmarks: dict[str, list[dict]]) -> dict[str, float]:
        self.calls.append("evaluate")
        out = {
            name: float(np.mean([self.probabilities(p["prompt_token_ids"])[0] for p in problems]))
            for name, problems in benchmarks.items()
        }
        self.evaluations.append(out)
        return out

    def sender(self, specs: list[tuple[str, str, list[int]]]):
        self.calls.append("sync")
        return Loader(self.model, specs)

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def close(self) -> None:
        self.calls.append("close")


class Loader:
    """A sync's tensors into the sampler's model, checked against what was announced."""

    def __init__(self, model, specs: list[tuple[str, str, list[int]]]):
        self.params = dict(model.named_parameters())
        self.specs, self.sent = specs, []

    def send(self, name: str, tensor) -> None:
        with torch.no_grad():
            self.params[name].copy_(tensor)
        self.sent.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)))

    def finish(self) -> list[int]:
        assert self.sent == self.specs
        return [len(self.sent)]


@pytest.fixture(scope="module")
def tokenizer(tiny_student):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_student)


def requests(tokenizer) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "answer": "7",
            "prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"],
            "prefill": "",
        }
        for i, p in enumerate(PROBLEMS)
    ]


class Run:
    """A learner, its sampler and its step, all starting from the tiny student."""

    def __init__(self, tmp_path, student, tokenizer, *, lr=6e-5, heldout=None, **grpo):
        from transformers import AutoModelForCausalLM

        self.cfg = config(tmp_path, student, **grpo)
        g = self.cfg.grpo
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        accumulation = g.global_batch_size // g.micro_batch_size
        self.engine = TorchEngine(model, lr, accumulation, g.max_grad_norm)
        reference = copy.deepcopy(model).requires_grad_(False).eval() if g.kl_coef else None
        self.sampler = Sampler(self.cfg, student, tokenizer)
        self.prompts = requests(tokenizer)
        self.step = GRPOStep(
            self.engine, reference, self.sampler, g, self.prompts, heldout or {}, seed=5
        )

    def steps(self, first: int, last: int) -> list[dict]:
        return [self.step(index, {})[0] for index in range(first, last)]


@pytest.fixture(scope="module")
def trained(tiny_student, tokenizer, tmp_path_factory):
    """Eight steps with a KL term and a clip of 0.05; the sampler's answer probabilities
    before and after."""
    folder = tmp_path_factory.mktemp("trained")
    run = Run(folder, tiny_student, tokenizer, kl_coef=0.05, clip_eps=0.05)
    before = [run.sampler.probabilities(p["prompt_token_ids"]) for p in run.prompts]
    records = run.steps(0, 8)
    after = [run.sampler.probabilities(p["prompt_token_ids"]) for p in run.prompts]
    return run, records, np.array(before), np.array(after)


def test_the_rewarded_answer_gains_probability(trained):
    """Reward -> advantage -> loss sign: the right answer's probability rises behind every
    prompt, the wrong ones' falls, and so does the sampled reward."""
    _, records, before, after = trained
    assert (after[:, 0] > before[:, 0] + 0.2).all(), (before, after)
    assert (after[:, 1:].sum(1) < before[:, 1:].sum(1)).all()
    rewards = [r["reward_mean"] for r in records]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards


def test_every_step_logs_what_the_issue_asks(trained):
    run, records, _, _ = trained
    samples = run.cfg.grpo.prompts_per_step * run.cfg.grpo.group_size
    for index, r in enumerate(records):
        assert set(TRACKED) <= {k for k, v in r.items() if v is not None}
        assert r["reward_mean"] == pytest.approx(
            r["accuracy"] + FORMAT_REWARD * (r["answered"] - r["accuracy"])
        )
        assert r["truncated"] == pytest.approx(1 - r["answered"])  # `\\boxed{99` is cut off
        assert (
            r["kl"] >= 0
            and r["entropy"] > 0
            and r["response_length"] == len(run.sampler.answers[0])
        )
        assert r["tokens"] == samples * r["response_length"]
        assert r["samples_seen"] == (index + 1) * samples
        assert 0 <= r["clip_fraction"] <= 1
        assert min(r["rollout_seconds"], r["learner_seconds"], r["sync_seconds"]) > 0
        parts = r["rollout_seconds"] + r["learner_seconds"] + r["sync_seconds"]
        assert parts == pytest.approx(r["step_seconds"], rel=1e-6)
        # the loss is the clipped surrogate plus kl_coef x KL (no entropy term)
        assert r["loss"] == pytest.approx(r["pg_loss"] + 0.05 * r["kl"], rel=1e-5, abs=1e-7)
    # the policy starts as the reference (step 1's first mini-batch runs before any update)
    assert records[0]["kl"] < 0.01 < max(r["kl"] for r in records)
    # the second mini-batch of a step runs on updated weights: its ratios leave 1
    assert max(r["clip_fraction"] for r in records) > 0


def test_the_engines_get_the_learners_weights_after_every_update(trained):
    """Each step samples, frees the device, takes its update, wakes the engines and sends them
    every parameter: the sampler holds the learner's weights exactly."""
    run, records, _, _ = trained
    assert run.sampler.calls == ["sample", "sleep", "wake_up", "sync"] * len(records)
    sampled = dict(run.sampler.model.named_parameters())
    for name, param in run.engine.module.named_parameters():
        assert torch.equal(sampled[name], param), name


def test_the_first_pass_ratio_is_exactly_one(tiny_student, tokenizer, tmp_path):
    """Old log-probabilities are the learner's own: with weights that do not move (lr 0), every
    ratio is exactly 1 over both mini-batches, so no token is clipped even at a clip of 1e-6 and
    the surrogate is minus the mean advantage per token. One mini-batch takes them detached from
    the update's own pass: nothing is ever clipped, however far the weights move."""
    still = Run(tmp_path / "still", tiny_student, tokenizer, lr=0.0, clip_eps=1e-6, steps=2)
    for index, r in enumerate(still.steps(0, 2)):
        batch = still.sampler.sample(still.prompts, index)
        per_token = sum(
            a * len(c) for a, c in zip(batch.advantages, batch.completion_ids, strict=True)
        )
        assert r["clip_fraction"] == 0.0
        assert r["pg_loss"] == pytest.approx(-per_token / r["tokens"], abs=1e-6)
    one = Run(tmp_path / "one", tiny_student, tokenizer, lr=3e-2, mini_batches=1, steps=3)
    assert [r["clip_fraction"] for r in one.steps(0, 3)] == [0.0] * 3
    two = Run(tmp_path / "two", tiny_student, tokenizer, lr=3e-2, mini_batches=2, steps=3)
    assert max(r["clip_fraction"] for r in two.steps(0, 3)) > 0


def test_without_a_kl_term_there_is_no_reference(tiny_student, tokenizer, tmp_path):
    """kl_coef 0: no reference policy, `kl` is None (left out of the trackers), and the loss is
    the surrogate alone."""
    run = Run(tmp_path, tiny_student, tokenizer, steps=2)
    assert run.step.reference is None
    for r in run.steps(0, 2):
        assert r["kl"] is None and r["loss"] == pytest.approx(r["pg_loss"], rel=1e-6)


def test_heldout_accuracy_every_eval_every_steps_and_after_the_last(
    tiny_student, tokenizer, tmp_path
):
    """eval_every 2 over 5 steps: measured after steps 2, 4 and 5, once the step's weights are
    synced, and recorded as the engines report it."""
    heldout = {"khop": requests(tokenizer)[:3]}
    run = Run(tmp_path, tiny_student, tokenizer, heldout=heldout, steps=5, eval_every=2)
    records = run.steps(0, 5)
    measured = [i + 1 for i, r in enumerate(records) if "heldout_accuracy" in r]
    assert measured == [2, 4, 5]
    assert [records[s - 1]["heldout_accuracy"] for s in measured] == run.sampler.evaluations
    assert all(records[s - 1]["heldout_seconds"] > 0 for s in measured)
    step = ["sample", "sleep", "wake_up", "sync"]
    assert run.sampler.calls == [
        *step,
        *step,
        "evaluate",
        *step,
        *step,
        "evaluate",
        *step,
        "evaluate",
    ]


def test_a_resumed_run_replays_the_steps_of_the_uninterrupted_one(
    tiny_student, tokenizer, tmp_path
):
    """A run restored at step 3 (weights and optimizer state) with engines started on the base
    weights first sends them its own, then samples the same groups and takes the same updates
    as the run that went on."""
    straight = Run(tmp_path / "straight", tiny_student, tokenizer, steps=6)
    straight.steps(0, 3)
    weights = copy.deepcopy(straight.engine.module.state_dict())
    optimizer = copy.deepcopy(straight.engine.optimizer.state_dict())
    went_on = straight.steps(3, 6)

    resumed = Run(tmp_path / "resumed", tiny_student, tokenizer, steps=6)
    resumed.engine.module.load_state_dict(weights)
    resumed.engine.optimizer.load_state_dict(optimizer)
    replayed = resumed.steps(3, 6)
    assert resumed.sampler.calls[:2] == ["sync", "sample"]
    for again, first in zip(replayed, went_on, strict=True):
        for key in ("reward_mean", "accuracy", "response_length"):
            assert again[key] == first[key], key
        for key in ("loss", "pg_loss", "grad_norm"):
            assert again[key] == pytest.approx(first[key], rel=1e-6), key
