"""Evaluation's parts: the problems (decontaminated), the result files and their statistics, and
the two backends that produce the same rows (offline Ray Data + vLLM, an HTTP endpoint)."""
