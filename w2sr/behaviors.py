"""Cognitive behaviors of a reasoning trace, counted with documented phrase patterns.

The four behaviors of Gandhi et al. (2025, "Cognitive Behaviors that Enable Self-Improving
Reasoners") that a student can pick up from a teacher's traces, with enumeration in place of
backward chaining (which no phrase marks reliably):

- verification: checking a result ("let me check", "verify", "plugging back in", "sanity check")
- backtracking: abandoning a line of work ("wait", "that's wrong", "let me reconsider",
  "try a different approach")
- subgoal setting: splitting the problem ("first, we need to", "step 2:", "next, let's",
  "break this down")
- enumeration: working through cases or candidates ("case 2", "possible values",
  "for each value", "list all")

These are lexical markers, not a classifier: they count what a trace says it does, so a trace
that verifies silently scores zero and one that writes "wait" out of habit scores one. They are
meant for comparing models on the same prompts (teacher vs base student vs W2SR student), where
such biases largely cancel, not as absolute rates. Every pattern is case-insensitive and matches
on word boundaries; a trace's count is the number of non-overlapping matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PATTERNS: dict[str, list[str]] = {
    "verification": [
        r"let(?:'s| me| us) (?:double[- ])?(?:check|verify|confirm)",
        r"double[- ]check",
        r"\bverif(?:y|ies|ied|ying|ication)\b",
        r"\bto confirm\b",
        r"\bsanity check",
        r"\bplug(?:ging)? (?:it |this |these |them |that )?back",
        r"\bsubstitut(?:e|ing) (?:it |this |these |them |that )?back",
        r"\bcheck(?:ing)? (?:if|whether|that|our|my|the (?:answer|result|solution))\b",
    ],
    "backtracking": [
        r"\bwait\b",
        r"\bhmm+\b",
        r"\b(?:that|this) (?:is|was|'s) (?:not right|wrong|incorrect|a mistake)",
        r"\bthat's (?:not right|wrong|incorrect)",
        r"\b(?:i|we) made (?:a|an) (?:mistake|error)",
        r"\blet(?:'s| me| us) (?:re-?think|reconsider|re-?evaluate|re-?examine|start over|redo"
        r"|try again|go back)",
        r"\btry (?:a different|another) (?:approach|method|way)",
        r"\bon second thought",
    ],
    "subgoal_setting": [
        r"\bfirst,? (?:we|let's|let us|i)\b",
        r"\bstep \d+\b",
        r"\b(?:then|next),? (?:we|let's|let us|i) (?:need|will|should|can|must|have)\b",
        r"\bbreak (?:this|it|the problem) (?:down|into)",
        r"\b(?:we|i) (?:need|have) to (?:find|compute|calculate|determine|solve|figure out)\b",
        r"\bour (?:goal|task) is\b",
        r"\bsub-?(?:goal|problem|task)s?\b",
    ],
    "enumeration": [
        r"\bcase \d+\b",
        r"\b(?:list|enumerate|enumerating|listing) (?:all|the|every|each)\b",
        r"\bpossible (?:values|cases|options|outcomes|combinations|pairs)\b",
        r"\bfor each (?:possible )?(?:value|case|choice|option|pair)\b",
        r"\b(?:try|trying|test|testing|check|checking) (?:each|all|every) (?:possible )?"
        r"(?:value|case|option|number|possibilit)",
    ],
}

BEHAVIORS: dict[str, re.Pattern[str]] = {
    name: re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    for name, patterns in _PATTERNS.items()
}


def count_behaviors(trace: str) -> dict[str, int]:
    """How many times each behavior is marked in one trace."""
    return {name: len(pattern.findall(trace)) for name, pattern in BEHAVIORS.items()}


def summarize_behaviors(traces: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per behavior, the mean count per trace and the share of traces with at least one."""
    counts = [count_behaviors(trace) for trace in traces]
    n = max(len(counts), 1)
    return {
        name: {
            "mean": sum(c[name] for c in counts) / n,
            "share": sum(c[name] > 0 for c in counts) / n,
        }
        for name in BEHAVIORS
    }
