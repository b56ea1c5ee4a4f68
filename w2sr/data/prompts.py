"""Prompt rendering: the one place a problem becomes the token ids a model is given.

Generation, SFT, GRPO and evaluation all render here, so a student is trained and tested on
exactly the text its teacher was asked, each through its own chat template.
"""

from __future__ import annotations

import json

from w2sr.data.templates import Template


def render(
    tokenizer, template: Template, problems: list[str], thinking: bool | None = None
) -> tuple[list[str], list[list[int]]]:
    """The prompt texts (the template's messages through the model's chat template, ready to
    answer) and their token ids."""
    texts = [template.render(tokenizer, problem, thinking) for problem in problems]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return texts, ids


def render_prompts(
    tokenizer,
    template: Template,
    rows: list[dict],
    max_len: int,
    start: int = 0,
    thinking: bool | None = None,
) -> tuple[list[dict], list[dict]]:
    """Rows with `prompt` and `prompt_token_ids` added, and the rejections of prompts that leave
    no room to answer within `max_len` tokens (REJECTED_SCHEMA rows, indexed by position in the
    problem set, of which `rows` begin at `start`)."""
    texts, ids = render(tokenizer, template, [row["problem"] for row in rows], thinking)
    kept, rejected = [], []
    for index, (row, text, tokens) in enumerate(zip(rows, texts, ids, strict=True), start):
        if len(tokens) >= max_len:
            reason = f"prompt has {len(tokens)} tokens; max_model_len is {max_len}"
            rejected.append(
                {
                    "index": index,
                    "prompt_id": row["prompt_id"],
                    "reason": reason,
                    "row": json.dumps(row),
                }
            )
            continue
        kept.append({**row, "prompt": text, "prompt_token_ids": tokens})
    return kept, rejected


def load_tokenizer(model_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
