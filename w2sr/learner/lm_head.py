"""The LM head only where a loss reads it: logits at the positions that have targets, and the
cross-entropy of SFT chunk by chunk, so full fp32 logits over the vocabulary never exist.

With a real vocabulary (49K for SmolLM2, 152K for Qwen2.5) the head is most of a small model's
cost and its fp32 logits most of a step's memory; prompt positions need none of it. This module
needs torch alone (the GPU learner check imports it without Ray or DeepSpeed).
"""

from __future__ import annotations

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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grads):  # type: ignore[override]
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            logz = torch.logsumexp(logits, dim=-1)
            total += (logz - logits.gather(1, t[:, None])[:, 0]).sum()
            if grads:
                probs = logits.sub_(logz[:, None]).exp_()  # d loss / d logits = softmax - one-hot
                probs[torch.arange(len(t), device=t.device), t] -= 1
                g = probs.to(hidden.dtype)
                grad_hidden[start : start + chunk] = g @ weight  # type: ignore[index]
                grad_weight += (g.T @ h).float()  # type: ignore[operator]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None,
            None,
            None,
        )
