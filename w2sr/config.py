"""One typed experiment config, loaded from YAML with dotted command-line overrides.

Every section mirrors a YAML block one to one. Validation runs before any Ray work, so a typo or
an impossible value costs nothing; errors name the dotted key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from w2sr.data.benchmarks import EVAL_BENCHMARKS
from w2sr.data.sources import BenchmarkRef, PromptSource, ReasoningGymSource
from w2sr.data.templates import TEMPLATES
from w2sr.grading import GRADERS
from w2sr.layout import RUN_LABELS, VARIANT_NAMES
from w2sr.models import ModelSpec
from w2sr.strict import ConfigError, Fraction, PositiveInt, Strict

# `train.variant`: the names of layout.VARIANTS, spelled out because a type checker reads a
# Literal's values only from the source.
VariantName = Literal["all", "correct", "incorrect"]
if get_args(VariantName) != VARIANT_NAMES:
    raise ImportError(f"VariantName {get_args(VariantName)} != layout.VARIANT_NAMES")


# --- prompts ---------------------------------------------------------------------------------


class PromptsConfig(Strict):
    source: PromptSource = Field(default_factory=ReasoningGymSource)
    limit: PositiveInt | None = None


# --- engines ---------------------------------------------------------------------------------


class Replicas(Strict):
    """A fixed pool (min == max) or an autoscaling range of engine replicas."""

    min: PositiveInt = 1
    max: PositiveInt = 1

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min": value, "max": value}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class EngineConfig(Strict):
    """How vLLM engines are laid out; the same block serves generation, evaluation and serving."""

    OPERATIONAL = frozenset(
        {
            "replicas",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "accelerator_type",
            "batch_size",
            "enforce_eager",
            "gpu_memory_utilization",
            "cpu_kv_cache_gib",
            "cpus_per_replica",
            "max_restarts",
        }
    )

    replicas: Replicas = Field(default_factory=Replicas)
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    accelerator_type: str | None = None
    batch_size: PositiveInt = 16
    max_model_len: PositiveInt = 2048
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = True
    gpu_memory_utilization: Fraction = 0.3
    cpu_kv_cache_gib: PositiveInt = 1
    cpus_per_replica: PositiveInt = 1
    # How often a generation or evaluation pipeline replaces a crashed engine replica before the
    # stage fails; Ray Data's own default is without end, so an engine that always crashes
    # mid-batch would hang the stage.
    max_restarts: Annotated[int, Field(ge=0)] = 4


class SamplingConfig(Strict):
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Fraction = 1.0
    max_tokens: PositiveInt = 512
    seed: int = 0


class GenerationConfig(Strict):
    samples_per_prompt: PositiveInt = 4
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    prompts_per_shard: PositiveInt = 256


# --- training --------------------------------------------------------------------------------


class LearnerConfig(Strict):
    """What SFT and GRPO share: the DeepSpeed learner on a Ray Train worker group, its
    checkpoints and its trackers. Each stage adds its objective and its batch."""

    # How a learner runs, not what it learns: the same math, checkpoints and trackers.
    OPERATIONAL = frozenset(
        {
            "gradient_checkpointing",
            "attn_implementation",
            "checkpoint_every",
            "num_to_keep",
            "max_failures",
            "mlflow_tracking_uri",
            "wandb_project",
            "profile_step",
        }
    )

    num_workers: PositiveInt = 2
    zero_stage: Literal[2, 3] = 3
    lr: Annotated[float, Field(gt=0)] = 2e-5
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    micro_batch_size: PositiveInt = 1
    bf16: bool = True
    gradient_checkpointing: bool = False
    # With sdpa, packed rows are attended sample by sample (w2sr.learner.attention);
    # flash_attention_2 (GPU, needs flash-attn) reads them from their position ids.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    seed: int = 0
    checkpoint_every: PositiveInt = 50
    num_to_keep: PositiveInt = 2
    max_failures: Annotated[int, Field(ge=-1)] = 0
    mlflow_tracking_uri: str | None = None
    wandb_project: str | None = None
    # Step N (from 1) runs under torch's profiler; rank 0 writes its table of operators to
    # `profile-step-N.txt` in the stage folder: where a step's time goes.
    profile_step: PositiveInt | None = None

    if TYPE_CHECKING:
        # Samples per optimizer step, and the optimizer's schedule: fields of SFT, properties
        # (fixed values) of GRPO. Declared for type checkers only: at run time a property here
        # would hide SFT's fields.
        @property
        def global_batch_size(self) -> int: ...
        @property
        def lr_scheduler(self) -> str: ...
        @property
        def warmup_ratio(self) -> float: ...
        @property
        def weight_decay(self) -> float: ...
        @property
        def offload_optimizer(self) -> bool: ...

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


class TrainConfig(LearnerConfig):
    """SFT of the student on a selected trace set (the paper's recipe by default)."""

    variant: VariantName = "all"
    offload_optimizer: bool = False
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    global_batch_size: PositiveInt = 128
    cutoff_len: PositiveInt = 4096
    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None
    # Samples of a micro-batch share one row (positions restart, no attention across samples)
    # instead of being padded to the longest: same gradient, no compute spent on padding.
    packing: bool = True
    # A reasoning teacher's `<think> ... </think>` block in the SFT targets: `keep` trains the
    # student to think before answering, `strip` on the answer that follows the block alone.
    reasoning: Literal["keep", "strip"] = "keep"
    SILENT_AT_DEFAULT = frozenset({"reasoning"})

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is not a multiple of "
                f"micro_batch_size x num_workers ({per_step})"
            )
        return self


Match = Literal["none", "traces", "tokens"]


class SelectConfig(Strict):
    """How the three training sets are cut from the traces.

    `match: traces` or `tokens` subsamples W2SR, W2SR-P and W2SR-N (seeded by the run's `seed`) to
    the size of the smallest non-empty one, in traces or in completion tokens, so that comparing
    their students compares what the traces say, not how many there are.
    """

    match: Match = "none"


def _rollout_sampling() -> SamplingConfig:
    # SimpleRL-Zoo samples rollouts at temperature 1.0: the policy's own distribution.
    return SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=1024)


class GRPOConfig(LearnerConfig):
    """The RL baseline: GRPO on the student with the run's grader as reward (SimpleRL-Zoo's
    coefficients by default). One step samples `group_size` completions for each of
    `prompts_per_step` prompts and takes `mini_batches` optimizer steps on them."""

    OPERATIONAL = LearnerConfig.OPERATIONAL | {
        "placement",
        "weight_sync",
        "cpus_per_worker",
        "eval_every",
    }

    steps: PositiveInt = 100
    prompts_per_step: PositiveInt = 32
    group_size: Annotated[int, Field(ge=2)] = 8
    mini_batches: PositiveInt = 1
    micro_batch_size: PositiveInt = 4
    lr: Annotated[float, Field(gt=0)] = 1e-6
    clip_eps: Annotated[float, Field(gt=0, lt=1)] = 0.2
    kl_coef: Annotated[float, Field(ge=0)] = 1e-4  # 0: no reference model at all
    entropy_coef: Annotated[float, Field(ge=0)] = 0.001
    # Reward of a wrong answer the grader could read (a correct one earns 1, no answer 0).
    format_reward: Annotated[float, Field(ge=0, lt=1)] = 0.0
    sampling: SamplingConfig = Field(default_factory=_rollout_sampling)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # colocated: engine i runs beside learner worker i on its resources (on a GPU, sharing its
    # device with `engine.gpu_memory_utilization` of it, asleep while the learner updates);
    # separate: rollout engines hold resources of their own.
    placement: Literal["colocated", "separate"] = "colocated"
    # How updated weights reach the engines (w2sr.engines.weight_sync): `collective` broadcasts
    # them in a process group (NCCL on GPUs, gloo on CPU); `object_store` passes CPU copies
    # through Ray. auto: collective for separate engines on GPUs, object_store otherwise (NCCL
    # cannot join two processes on one GPU, as a colocated engine and its learner worker are).
    weight_sync: Literal["auto", "collective", "object_store"] = "auto"
    # CPUs (and torch threads) of each learner worker; a colocated engine, which computes while
    # its worker waits, runs with as many threads.
    cpus_per_worker: PositiveInt = 1
    checkpoint_every: PositiveInt = 10
    # Every `eval_every` steps and after the last, the rollout engines answer each of the eval
    # benchmarks' problems once at `eval.sampling`: held-out accuracy along training against
    # the worker-hours spent, the report's cost curve. Unset: no evaluation during training.
    eval_every: PositiveInt | None = None

    @property
    def global_batch_size(self) -> int:
        return self.prompts_per_step * self.group_size // self.mini_batches

    # One optimizer step per mini-batch at a constant rate from the first step.
    @property
    def lr_scheduler(self) -> str:
        return "constant"

    @property
    def warmup_ratio(self) -> float:
        return 0.0

    @property
    def weight_decay(self) -> float:
        return 0.0

    @property
    def offload_optimizer(self) -> bool:
        return False

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        per_update = self.micro_batch_size * self.num_workers * self.mini_batches
        if (self.prompts_per_step * self.group_size) % per_update:
            raise ValueError(
                f"prompts_per_step x group_size ({self.prompts_per_step * self.group_size}) is "
                f"not a multiple of micro_batch_size x num_workers x mini_batches ({per_update})"
            )
        if self.sampling.temperature == 0:
            raise ValueError("sampling.temperature 0 makes every sample of a group the same")
        if self.engine.tensor_parallel_size > 1 or self.engine.pipeline_parallel_size > 1:
            raise ValueError("engine: rollout engines run in-process, one device each")
        if self.engine.replicas.min != self.engine.replicas.max:
            raise ValueError("engine.replicas: rollouts use a fixed pool (min == max)")
        if self.placement == "colocated" and self.engine.replicas.max > self.num_workers:
            raise ValueError(
                f"engine.replicas ({self.engine.replicas.max}) exceeds num_workers "
                f"({self.num_workers}): colocated engines live beside learner workers"
            )
        return self


# --- evaluation and serving ------------------------------------------------------------------

_LABEL_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"  # a label names a folder and a served model id
# A URI whose user part has a secret (`scheme://user:secret@host`). A user name alone is not one:
# Azure's `abfs://container@account...` and HDFS's `hdfs://user@namenode` name no secret.
_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:]*:[^/@]*@", re.IGNORECASE)


class EvalBenchmark(BenchmarkRef):
    """A benchmark the run's models are evaluated on. `samples`, `sampling` (merged over
    `eval.sampling`) and `pass_k` set here replace the eval section's for this benchmark, as
    AIME's 32 samples do in SimpleRL-Zoo's protocol.

    `limit` keeps the first N problems: a quick look, not a result to report.
    """

    limit: PositiveInt | None = None
    samples: PositiveInt | None = None
    sampling: SamplingConfig | None = None
    pass_k: list[PositiveInt] | None = None

    @model_validator(mode="after")
    def _evaluable(self) -> EvalBenchmark:
        if self.name not in EVAL_BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}; one of {sorted(EVAL_BENCHMARKS)}")
        return self


class EndpointConfig(Strict):
    """How `w2sr eval --endpoint URL` talks to an OpenAI-compatible server."""

    concurrency: PositiveInt = 32  # requests in flight
    timeout_s: Annotated[float, Field(gt=0)] = 600.0  # per request: a long CoT takes minutes
    retries: Annotated[int, Field(ge=0)] = 3  # on connection errors, time-outs, 429 and 5xx
    backoff_s: Annotated[float, Field(gt=0)] = 1.0  # first retry's wait; doubles, jittered, <= 30
    api_key_env: str = "W2SR_API_KEY"  # sent as a bearer token when this variable is set


def _eval_sampling() -> SamplingConfig:
    # DeepSeek-R1's protocol for long-CoT models: pass@1 averaged over k samples at T=0.6,
    # top-p 0.95. Greedy decoding makes such models loop and ranks them by one lucky draw.
    return SamplingConfig(temperature=0.6, top_p=0.95, max_tokens=1024)


# Named evaluation protocols: the values each sets, as defaults that keys given in the config
# override. `simplerl_zoo` is SimpleRL-Zoo's evaluator (hkust-nlp/simpleRL-reason,
# examples/simplelr_math_eval: eval_math_nodes.sh and math_eval.py), whose numbers the paper
# compares with: RL-trained models sampled once at T 1.0, top-p 0.95, AIME averaged over 32
# samples, base models greedy, answers read from the box, else "the answer is", else the last
# number (our `standard` policy).
ProtocolName = Literal["simplerl_zoo"]
PROTOCOLS: dict[ProtocolName, dict[str, Any]] = {
    "simplerl_zoo": {
        "samples": 1,
        "sampling": {"temperature": 1.0, "top_p": 0.95},
        "greedy": ["base"],
        "grading_policy": "standard",
        "benchmark_samples": {"aime24": 32, "aime25": 32},
    }
}


def _as_dict(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


@dataclass(frozen=True)
class EvalSetting:
    """How one model is evaluated on one benchmark: what its result's fingerprint holds."""

    samples: int
    sampling: SamplingConfig
    ks: list[int]  # the k of pass@k to report, ascending
    greedy: bool


class EvalConfig(Strict):
    """Every model of a run on every benchmark, `samples` completions per problem (per benchmark
    and per model where the protocol says so: `setting`)."""

    benchmarks: list[EvalBenchmark] = Field(
        default_factory=lambda: [EvalBenchmark(name="offline")], min_length=1
    )
    # A named protocol (PROTOCOLS) whose values are the defaults of the keys below.
    protocol: ProtocolName | None = None
    samples: PositiveInt = 4
    pass_k: list[PositiveInt] | None = None  # default: 1, 2, 4, ... up to samples
    sampling: SamplingConfig = Field(default_factory=_eval_sampling)
    # Models decoded greedily with one sample, by label (SimpleRL-Zoo decodes base models so).
    greedy: list[str] = Field(default_factory=list)
    # Which final answers count in evaluation; null: the run's `grading_policy`.
    grading_policy: Literal["strict", "standard"] | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    models: dict[str, str] = Field(default_factory=dict)  # extra `label: model spec`
    # How many pipelines run side by side, each with its own engines. The models of one
    # architecture (the base student, its fine-tunes, the RL student) share one pipeline whose
    # engines load each model in place; models of other architectures (a teacher) have their
    # own, whose start-ups overlap when run side by side. Ask for no more than the cluster holds
    # at once (the local session's size is checked).
    concurrent_models: PositiveInt = 1
    decontaminate: bool = True  # drop problems whose text is also a training prompt of the run
    bootstrap_resamples: PositiveInt = 2000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_protocol(cls, data: Any) -> Any:
        """The protocol's values under the keys given, and each benchmark's `sampling` merged
        over the section's."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = PROTOCOLS.get(data.get("protocol"), {})  # an unknown name fails validation
        for key in ("samples", "greedy", "grading_policy"):
            if key in preset:
                data.setdefault(key, preset[key])
        if preset:
            given = _as_dict(data.get("sampling")) or {}
            data["sampling"] = {**_eval_sampling().model_dump(), **preset["sampling"], **given}
        if "benchmarks" in data and isinstance(data["benchmarks"], list):
            section = _as_dict(data.get("sampling")) or {}
            entries = []
            for entry in data["benchmarks"]:
                entry = {"name": entry} if isinstance(entry, str) else entry
                if isinstance(entry, dict):
                    entry = dict(entry)
                    samples = preset.get("benchmark_samples", {}).get(entry.get("name"))
                    if samples is not None:
                        entry.setdefault("samples", samples)
                    if isinstance(entry.get("sampling"), dict):
                        base = {**_eval_sampling().model_dump(), **section}
                        entry["sampling"] = {**base, **entry["sampling"]}
                entries.append(entry)
            data["benchmarks"] = entries
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"benchmarks: listed twice: {twice}")
        for label in self.models:
            if label in RUN_LABELS:
                raise ValueError(f"models: {label!r} is a run label (one of {RUN_LABELS})")
            if not re.match(_LABEL_PATTERN, label):
                raise ValueError(f"models: label {label!r} must match {_LABEL_PATTERN}")
        if self.pass_k and max(self.pass_k) > self.samples:
            raise ValueError(f"pass_k: {max(self.pass_k)} exceeds samples ({self.samples})")
        if self.sampling.temperature == 0 and self.samples > 1:
            raise ValueError("sampling.temperature 0 is greedy: set samples: 1")
        for i, bench in enumerate(self.benchmarks):
            samples = bench.samples or self.samples
            sampling = bench.sampling or self.sampling
            if bench.pass_k and max(bench.pass_k) > samples:
                raise ValueError(
                    f"benchmarks.{i}.pass_k: {max(bench.pass_k)} exceeds samples ({samples})"
                )
            if sampling.temperature == 0 and samples > 1:
                raise ValueError(
                    f"benchmarks.{i}: sampling.temperature 0 is greedy: set samples: 1"
                )
        return self

    def benchmark(self, name: str) -> EvalBenchmark:
        return next(bench for bench in self.benchmarks if bench.name == name)

    def setting(self, bench: EvalBenchmark, label: str) -> EvalSetting:
        """The samples, sampling and k of pass@k of model `label` on `bench`."""
        sampling = bench.sampling or self.sampling
        if label in self.greedy:
            greedy = sampling.model_copy(update={"temperature": 0.0, "top_p": 1.0})
            return EvalSetting(1, greedy, [1], greedy=True)
        samples = bench.samples or self.samples
        if bench.pass_k or self.pass_k:
            ks = sorted({k for k in (bench.pass_k or self.pass_k or []) if k <= samples})
        else:
            ks = sorted({2**i for i in range(samples.bit_length())} | {samples})
        return EvalSetting(samples, sampling, ks, greedy=False)


class ServeConfig(Strict):
    """`w2sr serve`: models of the run behind one OpenAI-compatible app (Ray Serve LLM)."""

    models: list[str] | None = None  # labels to host; default: every trained student present
    # Serve's HTTP proxy has no auth: another host needs the API key that `api_key_env` names.
    host: str = "127.0.0.1"
    api_key_env: str = "W2SR_API_KEY"  # when this variable is set, requests must bear its key
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    engine: EngineConfig = Field(default_factory=EngineConfig)
    target_ongoing_requests: PositiveInt = 16  # per replica, what autoscaling aims for
    max_ongoing_requests: PositiveInt = 64  # per replica; more wait in the model's queue
    # Requests a model's queue holds beyond its replicas' ongoing ones; more are answered 503
    # at once, so an overloaded server sheds load instead of timing every client out.
    max_queued_requests: PositiveInt = 256
    app_name: str = "w2sr"


class JudgeConfig(Strict):
    """An OpenAI-compatible chat endpoint that labels the cognitive behaviors of responses: a
    model served by `w2sr serve`, or a hosted API (its key from the environment)."""

    endpoint: str  # the API's base URL, e.g. http://127.0.0.1:8000/v1
    model: str  # the model name the endpoint serves
    api_key_env: str = "W2SR_JUDGE_API_KEY"  # sent as a bearer token when this variable is set
    concurrency: PositiveInt = 8  # requests in flight
    timeout_s: Annotated[float, Field(gt=0)] = 120.0  # per request
    retries: Annotated[int, Field(ge=0)] = 3  # on connection errors, time-outs, 429 and 5xx
    # Responses judged per model (a seeded sample of them; null: all): a judge call per
    # response is the cost of this measure.
    max_responses: PositiveInt | None = 200
    max_tokens: PositiveInt = 256  # of the judge's reply


class ReportConfig(Strict):
    """How `w2sr report` measures what it cannot read off the results."""

    # Cognitive behaviors: `regex` counts English phrase markers offline (w2sr.behaviors);
    # `judge` asks a model per response, as SimpleRL-Zoo's behavior analysis does.
    behaviors: Literal["regex", "judge"] = "regex"
    judge: JudgeConfig | None = None

    @property
    def judge_used(self) -> JudgeConfig | None:
        return self.judge if self.behaviors == "judge" else None

    @model_validator(mode="after")
    def _judge_given(self) -> ReportConfig:
        if self.behaviors == "judge" and self.judge is None:
            raise ValueError("judge: behaviors: judge needs a judge section (endpoint, model)")
        return self


# --- the experiment --------------------------------------------------------------------------


class RayConfig(Strict):
    """Where to run: `address: null` starts a local session (its logical CPUs set by num_cpus)."""

    address: str | None = None
    num_cpus: PositiveInt | None = 8


class ExperimentConfig(Strict):
    run_dir: str
    teacher: str
    student: str | None = None
    use_gpu: bool = False
    trust_remote_code: bool = False
    template: str = "paper"
    grader: str = "math"
    # Which final answers count (w2sr.grading.POLICIES): `strict` an explicit one (\boxed{},
    # ####, <answer>); `standard` also what the standard evaluators read ("the answer is ...",
    # the last LaTeX expression, else the last number).
    grading_policy: Literal["strict", "standard"] = "strict"
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    grpo: GRPOConfig | None = None  # the RL baseline; null or absent: none
    # A published RL checkpoint as the RL reference (a hub id or a folder), in place of a GRPO
    # run of our own: RGR's denominator without paying for RL.
    rl: str | None = None
    # Chat templates rendered with thinking on or off (Qwen3's `enable_thinking`); null: each
    # template's own default. Templates that know no such switch ignore it.
    thinking: bool | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _known_names(self) -> ExperimentConfig:
        if self.template not in TEMPLATES:
            raise ValueError(f"template: unknown {self.template!r}; one of {sorted(TEMPLATES)}")
        for key, uri in self._locations().items():
            if _CREDENTIALS.match(uri):
                raise ValueError(
                    f"{key}: holds credentials; give them through the environment instead "
                    "(AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_USERNAME, ...), never in a config, "
                    "which is written to the run dir and sent to the trackers"
                )
        if self.grader not in GRADERS:
            raise ValueError(f"grader: unknown {self.grader!r}; one of {sorted(GRADERS)}")
        for key, spec in [("teacher", self.teacher), ("student", self.student)] + [
            (f"eval.models.{label}", spec) for label, spec in self.eval.models.items()
        ]:
            problem = model_spec_problem(spec) if spec else None
            if problem:
                raise ValueError(f"{key}: {problem}")
        if self.rl is not None:
            if self.grpo is not None:
                raise ValueError(
                    "rl: names an outside RL reference, and the grpo section trains one; keep one"
                )
            if self.student is None:
                raise ValueError("rl: an RL reference needs the student it was trained from")
            if problem := model_spec_problem(self.rl):
                raise ValueError(f"rl: {problem}")
        known = set(RUN_LABELS) | set(self.eval.models)
        for label in self.eval.greedy:
            if label not in known:
                raise ValueError(
                    f"eval.greedy: {label!r} is not a model of the run ({sorted(known)})"
                )
        g = self.grpo
        if g and self.use_gpu and g.placement == "colocated" and g.weight_sync == "collective":
            raise ValueError(
                "grpo.weight_sync: collective (NCCL) cannot join a colocated engine and its "
                "learner worker, which share a GPU; use object_store or placement: separate"
            )
        return self

    def _locations(self) -> dict[str, str]:
        """Every path or URI the config names, by key: the run dir, models, data, trackers and
        the judge's endpoint."""
        found = {"run_dir": self.run_dir, "teacher": self.teacher}
        found |= {key: spec for key, spec in (("student", self.student), ("rl", self.rl)) if spec}
        found |= {f"eval.models.{label}": spec for label, spec in self.eval.models.items()}
        source = self.prompts.source
        if path := getattr(source, "path", None):
            found["prompts.source.path"] = path
        for i, ref in enumerate(getattr(source, "exclude", [])):
            if ref.path:
                found[f"prompts.source.exclude.{i}.path"] = ref.path
        for i, bench in enumerate(self.eval.benchmarks):
            if bench.path:
                found[f"eval.benchmarks.{i}.path"] = bench.path
        for name in ("train", "grpo"):
            if (section := getattr(self, name)) and section.mlflow_tracking_uri:
                found[f"{name}.mlflow_tracking_uri"] = section.mlflow_tracking_uri
        if self.report.judge is not None:
            found["report.judge.endpoint"] = self.report.judge.endpoint
        return found

    @property
    def eval_grading_policy(self) -> str:
        """The policy evaluation grades with: its own, else the run's."""
        return self.eval.grading_policy or self.grading_policy

    def fields(self, *sections: str) -> dict[str, Any]:
        """The named sections as they decide a stage's outputs (`w2sr.layout.fingerprint`)."""
        picked = {}
        for name in sections:
            value = getattr(self, name)
            picked[name] = value.outcome() if isinstance(value, Strict) else value
        return picked


# --- loading ---------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value`, the value read as YAML so numbers, booleans and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is not a section, cannot set {path}")
        node = child
    node[path[-1]] = value


def model_spec_problem(spec: str) -> str | None:
    """Why a model spec cannot work, found without loading anything: an unknown built-in, or a
    local path (absolute or relative, never a hub id) that is not there."""
    try:
        model = ModelSpec.parse(spec)
    except ValueError as error:  # an unknown built-in
        return str(error)
    if model.kind == "folder" and not Path(spec).expanduser().exists():
        return f"no model folder at {spec}"
    return None


def format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        parts = [str(p) for p in item["loc"]]
        # A prompt source's type tag (`source.reasoning_gym`) is not a key the user wrote.
        parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "source")]
        loc, msg = ".".join(parts), item["msg"].removeprefix("Value error, ")
        key, sep, rest = msg.partition(": ")
        if sep and re.fullmatch(r"[a-z_][a-z0-9_.]*", key):  # a validator naming its key
            loc, msg = f"{loc}.{key}" if loc else key, rest
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return validate(data)
