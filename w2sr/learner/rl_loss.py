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


def _inputs(model, row: dict[str, Any]):
    device = next(iter(model.parameters())).device
    keys = ("input_ids", "position_ids", "attention_mask")
    return {k: row[k].to(device) for k in keys if k in row}, row["response"].to(device)


def response_logits(model, row: dict[str, Any]):
    """Logits at the positions that predict completion tokens (`rollout_rows`' `response`); where
    the model allows it (`lm_head.heads_at_positions`) the head runs at those positions only."""
    from w2sr.learner import lm_head

    inputs, response = _inputs(model, row)
    if lm_head.heads_at_positions(model):
        hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[response]
        return lm_head.hf_model(model).get_output_embeddings()(hidden).float()
    logits = model(**inputs, use_cache=False).logits
    return logits.flatten(0, 1)[response].float()


def _head(model):
    """The LM head's weight where the head can run at chosen positions on the model's own
    weight (not partitioned by ZeRO-3), else None."""
    from w2sr.learner import lm_head

    head = lm_head.hf_model(model).get_output_embeddings().weight
    return head if lm_head.heads_at_positions(model) and not hasattr(head, "ds_id") else None


def response_logprobs(model, row: dict[str, Any], targets):
    """The log-probabilities of the completion tokens `targets`, without gradient (the old
    policy's, the reference's); where `_head` allows, a few rows of logits at a time."""
    import torch

    from w2sr.learner import lm_head

    with torch.no_grad():
        head = _head(model)
        if head is None:
            return token_logprobs(response_logits(model, row), targets)[0]
        inputs, response = _inputs(model, row)
        hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[response]
        return lm_head.linear_logprobs(hidden, head, targets.to(hidden.device))


def response_loss(model, row: dict[str, Any], targets, token_loss, entropy_grad: bool = False):
    """The summed `token_loss(logp, entropy, rows)` over the completion tokens `targets`, and
    their log-probabilities and entropies (detached).

    Where `_head` allows, through `lm_head.linear_token_loss`: the loss's gradient reaches the
    head chunk by chunk, so with a 152K vocabulary the fp32 logits of a micro-batch's completions
    (most of a step's memory otherwise) never exist.
    """
    from w2sr.learner import lm_head

    head = _head(model)
    if head is None:
        logp, entropy = token_logprobs(response_logits(model, row), targets, entropy_grad)
        loss = token_loss(logp, entropy, slice(None)).sum()
        return loss, logp.detach(), entropy.detach()
    inputs, response = _inputs(model, row)
    hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[response]
    targets = targets.to(hidden.device)
    return lm_head.linear_token_loss(hidden, head, targets, token_loss, entropy_grad)


def token_logprobs(logits, targets, entropy_grad: bool = False):
    """Log-probabilities of the sampled tokens and the policy's entropy at each position; the
    entropy carries a gradient only when asked (a bonus in the loss), not when only logged."""
    import torch

    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.to(logits.device)[:, None])[:, 0] - logz
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def _terms(logp, old_logp, advantages, ref_logp, entropy, g: GRPOConfig):
    """Per-token loss and its parts: clipped surrogate, k3 KL to the reference, entropy bonus."""
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
    return loss, pg, kl, ratio, clipped, advantages


def micro_batch_loss(old_logp, advantages, ref_logp, g: GRPOConfig):
    """GRPO's per-token loss (clipped surrogate, k3 KL to the reference, entropy bonus) over some
    rows of a micro-batch, as `response_loss` asks for it. Without old log-probabilities (one
    optimizer step per rollout) the ratio is 1 by design."""

    def per_token(logp, entropy, rows):
        before = logp.detach() if old_logp is None else old_logp[rows]
        ref = None if ref_logp is None else ref_logp[rows]
        return _terms(logp, before, advantages[rows], ref, entropy, g)[0]

    return per_token


def policy_loss(logp, old_logp, advantages, ref_logp, entropy, g: GRPOConfig):
    """The per-token loss over whole tensors, and its statistics."""
    loss, pg, kl, ratio, clipped, advantages = _terms(
        logp, old_logp, advantages, ref_logp, entropy, g
    )
    stats = {
        "pg_loss": float(pg.detach().sum()),
        "kl": float(kl.detach().sum()) if kl is not None else 0.0,
        "entropy": float(entropy.detach().sum()),
        # tokens whose gradient the clip removed (TRL's and OpenRLHF's clip fraction)
        "clipped": float(((ratio - clipped) * advantages > 0).sum()),
    }
    return loss, stats
