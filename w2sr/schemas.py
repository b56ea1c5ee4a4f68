"""The columns of every Parquet artifact that passes between stages."""

from __future__ import annotations

import pyarrow as pa

PROBLEM_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),
    ]
)
PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("prompt", pa.string()),  # the rendered chat prompt, exactly as the teacher's engine saw it
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("shard", pa.int32()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("prompt_id", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),  # the source row as JSON
    ]
)
TRACE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),  # gold
        ("teacher", pa.string()),  # the model spec from the config
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("trace", pa.string()),
        ("extracted_answer", pa.string()),  # null when the trace gives no final answer
        ("correct", pa.bool_()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop" or "length" (truncated)
    ]
)
EVAL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # the label
        ("benchmark", pa.string()),
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),  # gold
        ("prompt", pa.string()),  # the rendered chat prompt (offline) or null (endpoint)
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("response", pa.string()),
        ("extracted_answer", pa.string()),  # null when the response gives no final answer
        ("correct", pa.bool_()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        # "stop", "length" (truncated), or TOO_LONG (not generated, counted wrong)
        ("finish_reason", pa.string()),
    ]
)
TOO_LONG = "prompt_too_long"
