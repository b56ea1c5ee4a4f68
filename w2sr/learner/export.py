"""The trained model as a standard Hugging Face folder, the artifact later stages read."""

from __future__ import annotations


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
