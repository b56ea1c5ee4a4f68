"""The LM head only where a loss reads it: logits at the positions that have targets, and SFT's
cross-entropy and GRPO's token log-probabilities chunk by chunk, so full fp32 logits over the
vocabulary never exist.

With a real vocabulary (49K for SmolLM2, 152K for Qwen2.5) the head is most of a small model's
cost and its fp32 logits most of a step's memory; prompt positions need none of it. This module
needs torch alone (the GPU learner check imports it without Ray or DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Model types whose logits are the LM head of the last hidden state, nothing after it (no
# softcapping or scaling): for them the head can be applied at chosen positions.
HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
CHUNK = 2048  # rows of logits alive at once


def hf_model(model: Any) -> Any:
    """The transformers model behind a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def heads_at_positions(model: Any) -> bool:
    return hf_model(model).config.model_type in HEAD_MODEL_TYPES


def last_hidden(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The last layer's normed hidden states, [batch, seq, hidden], with no logits computed.

    Called through the engine (not its inner model) so that DeepSpeed's forward runs as usual;
    the states are caught at the decoder's final norm, so no other layer's are kept.
    """
    caught: list[torch.Tensor] = []
    norm = hf_model(model).get_decoder().norm
    hook = norm.register_forward_hook(lambda _module, _args, out: caught.append(out))
    none = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        model(**inputs, use_cache=False, logits_to_keep=none)
    finally:
        hook.remove()
    return caught[-1]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ weight.T` (fp32 logits) against `targets`, as
    `F.cross_entropy(..., reduction="sum")` gives, computing `chunk` rows of logits at a time.

    The gradients are made in the same pass (as Liger's fused linear cross-entropy does), so no
    chunk's logits are kept or recomputed for the backward.
    """
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, grads)


class _GradsMadeInForward(torch.autograd.Function):
    """A head loss whose forward makes its gradients chunk by chunk (`_add_grads`), saved for
    the backward to scale by the loss's own gradient; `ctx.others` inputs take none."""

    @staticmethod
    def backward(ctx, grad_output, *_):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            *[None] * ctx.others,
        )


def _add_grads(grad_logits, h, weight, grad_hidden, grad_weight, part: slice) -> None:
    """Carry a chunk's gradient on its logits to its hidden states and to the head."""
    g = grad_logits.to(h.dtype)
    grad_hidden[part] = g @ weight
    grad_weight += (g.T @ h).float()


class _LinearCrossEntropy(_GradsMadeInForward):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grads):  # type: ignore[override]
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logq = _log_softmax(h, weight)
            total -= logq.gather(1, t[:, None])[:, 0].sum()
            if grads:
                probs = logq.exp_()  # d loss / d logits = softmax - one-hot
                probs[torch.arange(len(t), device=t.device), t] -= 1
                part = slice(start, start + chunk)
                _add_grads(probs, h, weight, grad_hidden, grad_weight, part)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.others = weight.dtype, 3
        return total


def _log_softmax(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A chunk's fp32 log-softmax over the vocabulary."""
    logits = (h @ weight.T).float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """The fp32 log-probability of each target under `hidden @ weight.T`, `chunk` rows of
    logits at a time, without gradient (the old policy's and the reference's)."""
    return torch.cat(
        [
            _log_softmax(hidden[i : i + chunk], weight).gather(1, targets[i : i + chunk, None])[
                :, 0
            ]
            for i in range(0, hidden.shape[0], chunk)
        ]
    )


TokenLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss: TokenLoss,
    entropy_grad: bool = False,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sum of `token_loss(logp, entropy, rows)` over every row, where `logp` is the fp32
    log-probability of the row's target under `hidden @ weight.T` and `entropy` the policy's
    entropy there, with the rows' log-probabilities and entropies (detached) beside it.

    `token_loss` maps a chunk's values (and the slice of rows they are) to per-row losses, each
    row's depending on its own values only, as GRPO's does. Its gradient is taken chunk by chunk
    in the forward and carried to the head (as `linear_cross_entropy` does), so no logits are
    kept or recomputed. The entropy carries a gradient only when asked (a bonus in the loss).
    """
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearTokenLoss.apply(hidden, weight, targets, token_loss, entropy_grad, chunk, grads)


class _LinearTokenLoss(_GradsMadeInForward):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss, entropy_grad, chunk, grads):  # type: ignore[override]
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            h, t = hidden[part], targets[part]
            logq = _log_softmax(h, weight)
            probs = logq.exp()
            logp[part] = logq.gather(1, t[:, None])[:, 0]
            entropy[part] = -(probs * logq).sum(-1)
            with torch.enable_grad():
                lp = logp[part].clone().requires_grad_()
                en = entropy[part].clone().requires_grad_(entropy_grad)
                loss = token_loss(lp, en, part).sum()
            total += loss.detach()
            if not grads:
                continue
            found = torch.autograd.grad(
                loss, [lp, en] if entropy_grad else [lp], materialize_grads=True
            )
            d_logp, d_entropy = found[0], found[1] if entropy_grad else None
            # d logp / d logits = one-hot - softmax; d entropy / d logits = -p (log p + H)
            grad = probs * -d_logp[:, None]
            grad[torch.arange(len(t), device=t.device), t] += d_logp
            if d_entropy is not None:
                grad -= probs * (logq + entropy[part, None]) * d_entropy[:, None]
            _add_grads(grad, h, weight, grad_hidden, grad_weight, part)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.others = weight.dtype, 5
        ctx.mark_non_differentiable(logp, entropy)
        return total, logp, entropy
