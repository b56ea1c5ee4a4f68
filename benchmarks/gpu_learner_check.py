"""The learner's steps on one GPU with torch and transformers alone (no Ray, vLLM or DeepSpeed).

On a randomly initialised model of Qwen2.5-1.5B's shapes (vocabulary 151,936), in bf16, over
packed rows (positions restarting at each sample, as `w2sr train` packs them):
  - SFT: the loss through w2sr's head at target positions in chunks (`w2sr.learner.lm_head`)
    against the plain loss over full fp32 logits;
  - GRPO: the policy loss with its KL to a reference through w2sr's `response_loss` (the head
    at completion positions in chunks, the loss's gradient taken in the forward) against the
    loss over full logits;
each with and without gradient checkpointing, under each attention implementation at hand (w2sr's
`sample_sdpa`; `flash_attention_2` where flash-attn is installed). Each variant reports tokens per
second, model FLOPs utilisation against the GPU's dense bf16 peak, and peak memory; before the
timings, each loss path's value and gradient are checked against the plain path's on one batch.

A step is forward, backward and torch's AdamW over bf16 weights (DeepSpeed's bf16 mode adds fp32
master weights and optimizer states: more memory, the same compute). Model FLOPs count what a
step needs: 6 x parameters per token in the layers, the head at the positions with a loss, and
causal attention within each sample; recomputation under checkpointing is not counted.

    python benchmarks/gpu_learner_check.py [--shape qwen2.5-1.5b] [--tokens 16384] [--steps 4]
    python benchmarks/gpu_learner_check.py --shape tiny --device cpu   # the CPU test's run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from w2sr.learner import lm_head  # noqa: E402
from w2sr.learner.attention import attention  # noqa: E402
from w2sr.learner.rl_loss import (  # noqa: E402
    micro_batch_loss,
    response_logprobs,
    response_loss,
    token_logprobs,
)

IGNORE = -100
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}
# Dense bf16 tensor-core peaks (NVIDIA's data sheets, SXM parts), TFLOP/s.
BF16_PEAK = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
GRPO: Any = SimpleNamespace(clip_eps=0.2, kl_coef=1e-3, entropy_coef=0.0)


def packed_row(tokens: int, vocab: int, lengths: tuple[int, int], prompt: float, seed: int):
    """One packed row of random samples: ids, restarting positions, shifted targets with the
    first `prompt` share of each sample left out, and each sample's length."""
    rng = random.Random(seed)
    sizes: list[int] = []
    while sum(sizes) < tokens:
        sizes.append(min(rng.randint(*lengths), tokens - sum(sizes)))
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    targets = torch.full((tokens,), IGNORE)
    positions: list[int] = []
    start = 0
    for size in sizes:
        positions.extend(range(size))
        first = start + max(1, int(size * prompt))
        targets[first - 1 : start + size - 1] = ids[first : start + size]
        start += size
    return {
        "input_ids": ids[None],
        "position_ids": torch.tensor(positions)[None],
        "targets": targets,
        "sizes": sizes,
    }


def sft_loss(model, row, chunked: bool):
    inputs = {k: row[k] for k in ("input_ids", "position_ids")}
    kept = row["targets"] != IGNORE
    if chunked:
        hidden = lm_head.last_hidden(model, inputs).flatten(0, 1)[kept]
        weight = model.get_output_embeddings().weight
        return lm_head.linear_cross_entropy(hidden, weight, row["targets"][kept])
    logits = model(**inputs, use_cache=False).logits.flatten(0, 1).float()
    return F.cross_entropy(logits, row["targets"], ignore_index=IGNORE, reduction="sum")


def full_logprobs(model, row, entropy_grad: bool = False):
    inputs = {k: row[k] for k in ("input_ids", "position_ids")}
    logits = model(**inputs, use_cache=False).logits.flatten(0, 1)[row["response"]].float()
    return token_logprobs(logits, row["targets_at"], entropy_grad)


def grpo_loss(model, row, chunked: bool):
    """The clipped policy loss with a k3 KL to a reference (the same weights, without gradient:
    a reference forward's cost without a second model's memory)."""
    if chunked:
        ref = response_logprobs(model, row, row["targets_at"]) - 0.01
    else:
        with torch.no_grad():
            ref = full_logprobs(model, row)[0] - 0.01

    per_token = micro_batch_loss(None, row["advantages"], ref, GRPO)
    if chunked:
        return response_loss(model, row, row["targets_at"], per_token)[0]
    logp, entropy = full_logprobs(model, row)
    return per_token(logp, entropy, slice(None)).sum()


def as_rollouts(row):
    """The packed row read as GRPO rollouts: the target positions are completions, with an
    advantage of +1 or -1 per sample."""
    response = (row["targets"] != IGNORE).nonzero().flatten()
    signs, start = [], 0
    for i, size in enumerate(row["sizes"]):
        count = int(((response >= start) & (response < start + size)).sum())
        signs.extend([1.0 if i % 2 else -1.0] * count)
        start += size
    return {
        **row,
        "response": response,
        "targets_at": row["targets"][response],
        "advantages": torch.tensor(signs),
    }


def model_flops(config, row, head_positions: int) -> float:
    """What a step needs (forward and backward, 3x the forward's): layers per token, the head
    at the positions with a loss, causal attention within each sample."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    tokens = sum(row["sizes"])
    dense = 2 * layers * per_layer * tokens
    attention_flops = layers * 2 * h * sum(n * n for n in row["sizes"])  # QK and AV, causal half
    head = 2 * h * config.vocab_size * head_positions
    return 3.0 * (dense + attention_flops + head)


def close(a, b, rtol: float) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


def check_equal(model, row, loss_fn, label: str, rtol: float) -> dict:
    """The loss and gradients of the w2sr path against the plain path's on one batch."""
    out = []
    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, row, fast)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        out.append((loss.detach().float(), grads))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = out
    cosine = float(F.cosine_similarity(fast_grads, plain_grads, dim=0))
    ok = close(fast_loss, plain_loss, rtol) and cosine > 1 - rtol
    return {
        "check": label,
        "ok": ok,
        "loss": float(fast_loss),
        "plain_loss": float(plain_loss),
        "gradient_cosine": cosine,
    }


def timed(model, row, loss_fn, fast: bool, steps: int, device) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

    def step():
        loss = loss_fn(model, row, fast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels chosen, optimizer states made
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"step_seconds": seconds, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--tokens", type=int, help="tokens per packed row (16384; tiny: 512)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="a JSON-lines file for every row printed")
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(args.device)
    tiny = args.shape == "tiny"
    tokens = args.tokens or (512 if tiny else 16384)
    lengths = (16, 96) if tiny else (512, 4096)
    rtol = 1e-3  # bf16: the two paths round in different orders
    config = Qwen2Config(**SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    names = [attention("sdpa", config)]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        names.append("flash_attention_2")
    row = packed_row(tokens, config.vocab_size, lengths, prompt=0.15, seed=0)
    row = as_rollouts({k: v.to(device) if torch.is_tensor(v) else v for k, v in row.items()})
    # The paths are compared on a quarter row: the plain path's gradients and the two sets of
    # gradients kept for the comparison do not fit beside a whole row's activations on 80 GB.
    check_row = packed_row(tokens // 4, config.vocab_size, lengths, prompt=0.15, seed=1)
    check_row = as_rollouts(
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in check_row.items()}
    )
    labelled = len(row["response"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in gpu), None)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.shape}: {params / 1e6:,.0f}M parameters, vocabulary {config.vocab_size:,}, "
        f"bf16, one packed row of {tokens:,} tokens ({len(row['sizes'])} samples, {labelled:,} "
        f"with a loss), on {gpu}" + (f" (bf16 peak {peak} TFLOP/s)" if peak else ""),
        flush=True,
    )
    rows = []
    failed = False
    for name in names:
        model.set_attn_implementation(name)
        for loss_fn, label in ((sft_loss, "sft"), (grpo_loss, "grpo")):
            result = check_equal(model, check_row, loss_fn, f"{label} {name}", rtol)
            failed |= not result["ok"]
            rows.append(result)
            print(
                f"{result['check']:28s} {'same' if result['ok'] else 'DIFFERENT'}: loss "
                f"{result['loss']:.4f} vs plain {result['plain_loss']:.4f}, gradient cosine "
                f"{result['gradient_cosine']:.6f}",
                flush=True,
            )
        model.zero_grad(set_to_none=True)
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            model.train()
            for loss_fn, label, paths in (
                (sft_loss, "sft", ("chunked head", "full logits")),
                (grpo_loss, "grpo", ("chunked head", "full logits")),
            ):
                for fast, path in zip((True, False), paths, strict=True):
                    flops = model_flops(config, row, labelled)
                    try:
                        t = timed(model, row, loss_fn, fast, args.steps, device)
                    except torch.OutOfMemoryError:
                        # A finding, not a failure: the plain path may not fit where ours does.
                        model.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        rows.append(
                            {
                                "step": label,
                                "attention": name,
                                "out_of_memory": True,
                                "checkpointing": checkpointing,
                                "loss_path": path,
                            }
                        )
                        print(
                            f"{label:4s} {name:17s} checkpointing "
                            f"{'on ' if checkpointing else 'off'} {path:17s} out of memory",
                            flush=True,
                        )
                        continue
                    result = {
                        "step": label,
                        "attention": name,
                        "checkpointing": checkpointing,
                        "loss_path": path,
                        "tokens_per_second": tokens / t["step_seconds"],
                        "mfu": flops / t["step_seconds"] / (peak * 1e12) if peak else None,
                        **t,
                    }
                    rows.append(result)
                    mfu = f"MFU {result['mfu']:.1%}" if peak else "MFU n/a"
                    memory = f"peak {t['peak_bytes'] / 2**30:.1f} GiB" if t["peak_bytes"] else ""
                    print(
                        f"{label:4s} {name:17s} checkpointing {'on ' if checkpointing else 'off'} "
                        f"{path:17s} {result['tokens_per_second']:10,.0f} tokens/s  {mfu}  "
                        f"{memory}",
                        flush=True,
                    )
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if failed:
        sys.exit("a loss path differs from the plain one (see DIFFERENT above)")


if __name__ == "__main__":
    main()
