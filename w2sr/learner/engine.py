"""The DeepSpeed engine of a causal LM: its config, optimizer and schedule, and the token loss.

Every function that touches the engine is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from w2sr.config import LearnerConfig
from w2sr.learner.attention import attention
from w2sr.learner.batches import IGNORE


def deepspeed_config(train: LearnerConfig, use_gpu: bool) -> dict[str, Any]:
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
                # Without offload, torch's AdamW rather than DeepSpeed's fused Adam, an op it
                # compiles on first use (minutes with nvcc, a failure without it).
                "torch_adam": not train.offload_optimizer,
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


def load_cpu_ops(offload_optimizer: bool) -> None:
    """Load the CPU ops DeepSpeed will ask for, and keep it from building one it never uses.

    DeepSpeed's CPU backend builds its shared-memory all-reduce op when it starts, but only its
    inference all-reduce calls it (training reduces through gloo), and the build costs about a
    minute on a fresh machine; DeepSpeed reads its table of compatible ops from one dict, so
    marking the op there skips it.

    Every process that loads an op runs torch's extension build, under a lock file that outlives
    a process killed while holding it: from then on every training on the machine would wait for
    it forever. Here the loads happen under an OS lock (released when its holder dies); while it
    is held no live w2sr process is building, so a torch lock found then is stale and removed.
    DeepSpeed keeps a loaded op for the process, so its own later loads build nothing.
    """
    import fcntl

    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__
    from torch.utils.cpp_extension import _get_build_directory

    __compatible_ops__["deepspeed_shm_comm"] = False
    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if not offload_optimizer or not __compatible_ops__.get(builder.NAME, False):
        return
    build = Path(_get_build_directory(builder.name, verbose=False))
    build.parent.mkdir(parents=True, exist_ok=True)
    with open(build.parent / "w2sr-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        builder.load()


def build_engine(
    model_path: str,
    train: LearnerConfig,
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

    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    else:
        load_cpu_ops(train.offload_optimizer)
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
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, train.weight_decay),
        lr_scheduler=lambda optimizer: lr_schedule(train, optimizer, total_steps),
        config=config,
    )
    return engine, keep_alive


def lr_schedule(train: LearnerConfig, optimizer, total_steps: int):
    """`train`'s learning-rate schedule over `total_steps`, its warm-up included."""
    import math

    from transformers import get_scheduler

    # transformers' "constant" ignores warm-up steps; its warm-up twin has them.
    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    return get_scheduler(name, optimizer, math.ceil(train.warmup_ratio * total_steps), total_steps)


def data_parallel_scale(tokens: int, world: int) -> float:
    """The factor on a rank's summed token loss that makes an optimizer step follow the mean
    over the `tokens` of the whole (mini-)batch, whatever each rank's share: DeepSpeed averages
    gradients over the `world` ranks, so what they sum is divided by `world` once more."""
    return world / max(1, tokens)


def token_loss(model, batch: dict) -> tuple[Any, int]:
    """Sum of next-token cross-entropies over the batch's targets, and how many there are.

    `batch["targets"]` holds the already shifted labels (`learner.batches.sft_rows`); the KV cache
    is off so that transformers reads packed rows from their position ids. Where the model allows
    it (`lm_head.heads_at_positions`, weights not partitioned by ZeRO-3) the head runs only at
    target positions, chunk by chunk; the sum is the same.
    """
    import torch.nn.functional as F

    from w2sr.learner import lm_head

    device = next(iter(model.parameters())).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "targets"}
    targets = batch["targets"].to(device).flatten()
    kept = targets != IGNORE
    head = lm_head.hf_model(model).get_output_embeddings().weight
    if lm_head.heads_at_positions(model) and not hasattr(head, "ds_id"):
        hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[kept]
        return lm_head.linear_cross_entropy(hidden, head, targets[kept]), int(kept.sum())
    logits = model(**inputs, use_cache=False).logits
    logits = logits.flatten(0, 1).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"), int(kept.sum())
