"""Attention for training forwards: packed rows attended sample by sample with PyTorch's sdpa."""

from __future__ import annotations

import itertools
from typing import Any

SAMPLE_SDPA = "w2sr_sample_sdpa"


def attention(name: str, config) -> str:
    """The attention implementation to load a model with: `sdpa` becomes `sample_sdpa` for models
    whose layers are full or sliding-window causal attention (not chunked or other masks)."""
    import importlib.util

    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation: flash_attention_2 needs the flash-attn package on every "
            "training node (pip install flash-attn --no-build-isolation); sdpa needs nothing "
            "and attends packed rows sample by sample"
        )
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


_spans: tuple[Any, list[list[tuple[int, int]]]] | None = None


def _sample_spans(position_ids, rows: int) -> list[list[tuple[int, int]]]:
    """Each row's samples as (start, end), found once per forward: every layer is handed the
    same position ids, and finding them reads the tensor back (a device sync on a GPU)."""
    global _spans
    if _spans is None or _spans[0] is not position_ids:
        found = []
        for positions in position_ids.expand(rows, -1):
            starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
            found.append(list(itertools.pairwise([0, *starts.tolist(), len(positions)])))
        _spans = (position_ids, found)
    return _spans[1]


def sample_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """PyTorch sdpa that keeps samples apart without a row-wide mask.

    A packed row (no padding, positions restarting at 0 at each sample) is attended sample by
    sample: the cost is the sum of the squared sample lengths, not the square of the row's, and
    no row x row mask is built. A padded batch gets the causal and padding mask. Sliding windows
    are kept. For a training forward (no KV cache) the result is sdpa's on the same inputs.
    """
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
    for b, spans in enumerate(_sample_spans(position_ids, query.shape[0])):
        parts = []
        for start, end in spans:
            long = window and end - start > window
            mask = _causal(end - start, window, query.device) if long else None
            q, k, v = (t[b : b + 1, :, start:end] for t in (query, key, value))
            parts.append(sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0])
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None
