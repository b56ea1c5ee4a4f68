"""The DeepSpeed learner that SFT and GRPO run inside Ray Train workers.

What lives here is independent of the objective: the DeepSpeed config from a `TrainConfig`, the
engine (model, AdamW, warmup + decay schedule), the token-level loss, checkpoints through Ray Train,
experiment trackers, and the export of a standard Hugging Face folder.

Every function that touches the engine is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, NamedTuple

from w2sr.config import ExperimentConfig, TrainConfig
from w2sr.sft_data import IGNORE

CHECKPOINT_TAG = "step{step}"  # never "latest": DeepSpeed writes a file of that name beside tags


class Worker(NamedTuple):
    """What a Ray Train worker of either stage knows about itself once started."""

    cfg: ExperimentConfig
    rank: int
    world: int
    seed: int
    tokenizer: Any
    started: float  # this attempt's start, for worker-seconds


def start_worker(config: dict[str, Any], section: str) -> Worker:
    """The first steps of a worker loop: the run's config, DeepSpeed's accelerator chosen before
    deepspeed is imported, the rank, torch seeded with `seed + <section>.seed`, the tokenizer of
    `config["model"]`."""
    started = time.time()
    cfg = ExperimentConfig.model_validate(config["cfg"])
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    import ray.train
    import torch
    from transformers import AutoTokenizer

    context = ray.train.get_context()
    seed = cfg.seed + getattr(cfg, section).seed
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(
        config["model"], trust_remote_code=cfg.trust_remote_code
    )
    return Worker(cfg, context.get_world_rank(), context.get_world_size(), seed, tokenizer, started)


def fit(
    worker_loop,
    cfg: ExperimentConfig,
    run,
    stage: str,
    name: str,
    section,
    loop_config: dict[str, Any],
    resources_per_worker: dict[str, float] | None = None,
):
    """Run `worker_loop` on a Ray Train worker group of `section.num_workers` (the `train` or
    `grpo` config): checkpoints under `<stage>/ray/<name>`, so a rerun of the same config finds
    them, and `section.max_failures` restarts. Returns Ray Train's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": cfg.model_copy(update={"run_dir": run.location()}).model_dump(mode="json"),
            "name": name,
            **loop_config,
        },
        scaling_config=ScalingConfig(
            num_workers=section.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources_per_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=run.location(stage, "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=section.num_to_keep),
            failure_config=FailureConfig(max_failures=section.max_failures),
        ),
    )
    return trainer.fit()


def deepspeed_config(train: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": use_gpu,
    }
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": train.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # On CPU without offload, torch's AdamW rather than an op DeepSpeed must compile.
                "torch_adam": not use_gpu and not train.offload_optimizer,
            },
        },
        "steps_per_print": 2**31 - 1,  # metrics are ours to log
        "wall_clock_breakdown": False,
    }


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and norm weights (1-D tensors) get no weight decay, as in HF Trainer.

    A ZeRO-3 partitioned parameter is an empty tensor: its shape is in `ds_shape`.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trained]
    decay = [p for p, m in zip(trained, matrix, strict=True) if m]
    rest = [p for p, m in zip(trained, matrix, strict=True) if not m]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


# --- attention -------------------------------------------------------------------------------

SAMPLE_SDPA = "w2sr_sample_sdpa"


def attention(name: str, config) -> str:
    """The attention implementation to load a model with: `sdpa` becomes `sample_sdpa` for models
    whose layers are full or sliding-window causal attention (not chunked or other masks)."""
    layers = set(getattr(config, "layer_types", None) or ["full_attention"])
    plain = layers <= {"full_attention", "sliding_attention"}
    if name != "sdpa" or not plain or getattr(config, "attention_chunk_size", None):
        return name
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(SAMPLE_SDPA, sample_sdpa)
    AttentionMaskInterface.register(SAMPLE_SDPA, _padding_mask)
    return SAMPLE_SDPA


def _padding_mask(*_, attention_mask=None, **__):
    """Hand `sample_sdpa` the 2-D padding mask as it is (None when nothing is padded)."""
    return None if attention_mask is None or bool(attention_mask.all()) else attention_mask


def _causal(n: int, window: int | None, device):
    import torch

    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask.triu(-(window - 1)) if window else mask


def sample_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """PyTorch sdpa that keeps samples apart without a row-wide mask.

    A packed row (no padding, positions restarting at 0 at each sample) is attended sample by
    sample: the cost is the sum of the squared sample lengths, not the square of the row's, and
    no row x row mask is built. A padded batch gets the causal and padding mask. Sliding windows
    are kept. For a training forward (no KV cache) the result is sdpa's on the same inputs.
    """
    import itertools

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.shape[2] != query.shape[2]:
        raise ValueError("sample_sdpa serves training forwards, without a KV cache")
    window = kwargs.get("sliding_window")
    if attention_mask is not None:
        mask = _causal(query.shape[2], window, query.device) & attention_mask[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device)[None]
    rows = []
    for b, positions in enumerate(position_ids.expand(query.shape[0], -1)):
        starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
        parts = []
        for start, end in itertools.pairwise([0, *starts.tolist(), query.shape[2]]):
            long = window and end - start > window
            mask = _causal(end - start, window, query.device) if long else None
            part = (t[b : b + 1, :, start:end] for t in (query, key, value))
            parts.append(sdpa_attention_forward(module, *part, mask, **kwargs)[0])
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def build_engine(
    model_path: str,
    train: TrainConfig,
    total_steps: int,
    *,
    use_gpu: bool,
    trust_remote_code: bool = False,
):
    """The DeepSpeed engine of a causal LM, its optimizer and its learning-rate schedule.

    With ZeRO-3 the model is built under `zero.Init` (through transformers' HfDeepSpeedConfig),
    so no rank ever holds all the weights. Returns the engine and the DeepSpeed config object,
    which must stay alive as long as the engine.
    """
    import math

    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler
    from transformers.integrations import HfDeepSpeedConfig

    if use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    # Join the process group Ray Train made, before zero.Init sizes its partitions by it.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    config = deepspeed_config(train, use_gpu)
    keep_alive = HfDeepSpeedConfig(config)  # read by from_pretrained through a weakref
    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=torch.bfloat16 if train.bf16 else torch.float32,
        attn_implementation=attention(train.attn_implementation, model_config),
        trust_remote_code=trust_remote_code,
    )
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    warmup = math.ceil(train.warmup_ratio * total_steps)

    # transformers' "constant" ignores warm-up steps; its warm-up twin has them.
    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler

    def schedule(optimizer):
        return get_scheduler(name, optimizer, warmup, total_steps)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, train.weight_decay),
        lr_scheduler=schedule,
        config=config,
    )
    return engine, keep_alive


def token_loss(model, batch: dict) -> tuple[Any, int]:
    """Sum of next-token cross-entropies over the batch's targets, and how many there are.

    `batch["targets"]` holds the already shifted labels (see sft_data); the KV cache is off so
    that transformers reads packed rows from their position ids.
    """
    import torch.nn.functional as F

    device = next(iter(model.parameters())).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "targets"}
    targets = batch["targets"].to(device)
    logits = model(**inputs, use_cache=False).logits
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank writes its ZeRO shards; Ray Train merges them into one persisted checkpoint.

    `state` (at least `step`) is DeepSpeed's client state and comes back from `restore`.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="w2sr-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG.format(**state), client_state=state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint-{state['step']:07d}",
        )


def restore(engine) -> dict[str, Any] | None:
    """Load the latest Ray Train checkpoint (weights, optimizer, schedule); its client state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        loaded, state = engine.load_checkpoint(
            path, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if loaded is None:
        raise RuntimeError(
            f"Ray Train handed back checkpoint {checkpoint.path} but it did not load"
        )
    return state


# --- export ----------------------------------------------------------------------------------


def export_hf(engine, tokenizer, out_dir: str | None, end_text: str) -> None:
    """Write the model as a standard Hugging Face folder (collective; rank 0 writes `out_dir`).

    ZeRO-3 partitions are gathered one tensor at a time. Beside the safetensors weights go the
    tokenizer with its chat template and a generation config whose eos ids include the
    end-of-turn the student was trained to emit, so vLLM and `generate` stop there.
    """
    import deepspeed
    import torch.distributed as dist

    model = engine.module
    rank0 = dist.get_rank() == 0
    persistent = set(model.state_dict())
    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if rank0:
                state[name] = param.detach().to("cpu", copy=True)
    if not rank0:
        return
    for name, buffer in model.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().to("cpu", copy=True)
    model.save_pretrained(out_dir, state_dict=state)
    tokenizer.save_pretrained(out_dir)
    generation = model.generation_config
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end_ids = tokenizer(end_text, add_special_tokens=False)["input_ids"]
    for token in ([end_ids[0]] if len(end_ids) == 1 else []) + [tokenizer.eos_token_id]:
        if token is not None and token not in eos:
            eos.append(token)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out_dir)


# --- experiment trackers ---------------------------------------------------------------------


def check_trackers(section, name: str) -> None:
    """A configured tracker must be installed: fail before any Ray work, not on rank 0 later.
    `section` is the `train` or `grpo` config, `name` its key."""
    import importlib.util

    for key, module in (("mlflow_tracking_uri", "mlflow"), ("wandb_project", "wandb")):
        if getattr(section, key) and importlib.util.find_spec(module) is None:
            raise RuntimeError(
                f"{name}.{key} is set but {module} is not installed: pip install {module}"
            )


class Trackers:
    """MLflow and W&B through Ray Train's integrations (rank 0 logs, the others get no-ops).
    `section` is the `train` or `grpo` config; `params` are recorded with the run."""

    def __init__(self, section, run_name: str, params: dict[str, Any]):
        self.mlflow = self.wandb = None
        if section.mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(
                params,
                tracking_uri=section.mlflow_tracking_uri,
                experiment_name="w2sr",
                run_name=run_name,
                create_experiment_if_not_exists=True,
            )
        if section.wandb_project:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(
                params, project=section.wandb_project, name=run_name, id=run_name, resume="allow"
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
