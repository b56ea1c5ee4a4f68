"""GRPO's frozen reference policy, for the KL term."""

from __future__ import annotations

from w2sr.config import GRPOConfig
from w2sr.learner.engine import deepspeed_config


def reference_model(model_path: str, grpo: GRPOConfig, *, use_gpu: bool, trust_remote_code: bool):
    """The base weights without an optimizer; under ZeRO-3 partitioned like the learner."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    config = deepspeed_config(grpo, use_gpu)
    config.pop("optimizer")
    config["zero_optimization"] = {"stage": 3 if grpo.zero_stage == 3 else 0}
    model = AutoModelForCausalLM.from_pretrained(  # zero.Init'ed under the learner's ZeRO-3
        model_path,
        dtype=torch.bfloat16 if grpo.bf16 else torch.float32,
        attn_implementation=grpo.attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
