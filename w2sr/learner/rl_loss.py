"""GRPO's maths, free of Ray and DeepSpeed: group-normalised advantages, token log-probabilities
and the clipped policy loss with its KL and entropy terms. Needs torch and numpy alone (the GPU
learner check imports it without the rest of w2sr's dependencies)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from w2sr.config import GRPOConfig


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """GRPO's advantages: each reward minus its group's mean, over the group's (sample) std.

    A group whose samples all earn the same reward teaches nothing: its advantages are 0.
    """
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def response_logits(model, row: dict[str, Any]):
    """Logits at the positions that predict completion tokens (`rollout_rows`' `response`); where
    the model allows it (`lm_head.heads_at_positions`) the head runs at those positions only."""
    from w2sr.learner import lm_head

    device = next(iter(model.parameters())).device
    keys = ("input_ids", "position_ids", "attention_mask")
    inputs = {k: row[k].to(device) for k in keys if k in row}
    response = row["response"].to(device)
    if lm_head.heads_at_positions(model):
        hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[response]
        return lm_head.hf_model(model).get_output_embeddings()(hidden).float()
    logits = model(**inputs, use_cache=False).logits
    return logits.flatten(0, 1)[response].float()


def token_logprobs(logits, targets, entropy_grad: bool = False):
    """Log-probabilities of the sampled tokens and the policy's entropy at each position; the
    entropy carries a gradient only when asked (a bonus in the loss), not when only logged."""
    import torch

    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.to(logits.device)[:, None])[:, 0] - logz
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def policy_loss(logp, old_logp, advantages, ref_logp, entropy, g: GRPOConfig):
    """Per-token loss and statistics: clipped surrogate, k3 KL to the reference, entropy bonus."""
    import torch

    advantages = advantages.to(logp.device)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - g.clip_eps, 1 + g.clip_eps)
    pg = -torch.minimum(ratio * advantages, clipped * advantages)
    loss = pg
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + g.kl_coef * kl
    if g.entropy_coef:
        loss = loss - g.entropy_coef * entropy
    stats = {
        "pg_loss": float(pg.detach().sum()),
        "kl": float(kl.detach().sum()) if kl is not None else 0.0,
        "entropy": float(entropy.detach().sum()),
        # tokens whose gradient the clip removed (TRL's and OpenRLHF's clip fraction)
        "clipped": float(((ratio - clipped) * advantages > 0).sum()),
    }
    return loss, stats
