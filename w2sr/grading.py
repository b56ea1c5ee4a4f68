"""Grading: pull the final answer out of a response and decide whether it equals the gold answer.

Most checks are settled here in microseconds, by normalised string equality or exact numeric
comparison. The rest (sets, intervals, tuples, symbolic expressions) go to math-verify. Its own
time-outs use `signal.alarm`, which works only in a process's main thread, so inside Ray actors
and threads they break; and a runaway sympy call cannot be interrupted in-process. So math-verify
runs with its time-outs off in one persistent worker process per grading process, and each check
gets a wall-clock limit: a check that overruns kills the worker (replaced on the next check) and
counts as incorrect.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction

logger = logging.getLogger(__name__)

# Part of every fingerprint that grading decides (traces, rewards, results): raise it whenever a
# change here can change a verdict.
VERSION = "3"
TIMEOUT_S = 5.0  # wall-clock limit for one math-verify check
# A response is read from its end, where its final answer stands: a trace that loops for
# megabytes costs no more than this much text per check.
MAX_RESPONSE_CHARS = 65_536
# A longer "final answer" is compared as a string only: no benchmark's gold is an essay, and
# numbers of thousands of digits (past Python's int-to-string limit) or LaTeX that expands
# without end must not reach the number parser or sympy.
MAX_ANSWER_CHARS = 512
_STARTUP_S = 120.0  # for the worker to import and warm up math-verify (slow on a loaded node)

# --- extraction ------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # escaped characters (\{, \}) are skipped


def _box_content(text: str, start: int) -> str | None:
    """The text from `start` up to the `}` that closes the box opened just before it."""
    depth = 1
    for token in _BRACE_TOKENS.finditer(text, start):
        depth += {"{": 1, "}": -1}.get(token.group(), 0)
        if depth == 0:
            return text[start : token.start()]
    return None


def _clean(answer: str | None) -> str | None:
    answer = (answer or "").strip()
    return answer.removesuffix(".").rstrip() or None


def extract_answer(text: str, policy: str = "strict") -> str | None:
    """The final answer a response gives, under a grading policy (POLICIES).

    `strict`: the last `\\boxed{}`/`\\fbox{}`, else the last `<answer></answer>`, else the last
    `#### N`. `standard` reads those first too, then what the standard evaluators accept: the
    last "the (final) answer is ...", else the last number or LaTeX expression, whichever ends
    later (see POLICIES).

    Only the answer part is read (split_reasoning): a reasoning model's thought may box answers
    it later revises, and a thought never closed holds no final answer at all. An unbalanced
    (e.g. truncated) last box gives None, not an earlier box: the last box is the model's final
    answer, and an earlier one may be an answer it went on to revise. Only the last
    MAX_RESPONSE_CHARS characters are read, each in one pass.
    """
    start = _answer_start(text)
    if start is None:
        return None
    text = text[max(start, len(text) - MAX_RESPONSE_CHARS) :]
    explicit = _explicit_answer(text)
    if explicit is not None or policy == "strict":
        return explicit
    return _standard_answer(text)


# A reasoning model's thought (DeepSeek-R1, Qwen3): the answer stands after it.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _answer_start(text: str) -> int | None:
    """Where a response's answer part begins: after its last `</think>`, 0 without one; None if
    a `<think>` after that is never closed. The tags are looked for in the whole text, so that a
    thought opened before the last MAX_RESPONSE_CHARS counts: two reverse substring scans, a
    fraction of a millisecond on a megabyte."""
    close = text.rfind(THINK_CLOSE)
    start = 0 if close < 0 else close + len(THINK_CLOSE)
    return None if text.rfind(THINK_OPEN, start) >= 0 else start


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """A response as `(reasoning, answer)`, the parts graders and SFT targets tell apart.

    Reasoning models write `<think> ... </think>` and then their answer; where a chat template's
    prefilled `<think>` stayed in the prompt, a response has a `</think>` alone. The reasoning is
    the text up to and including the last `</think>` (None without one) and the answer is the
    rest, so that `reasoning + answer == text`. A `<think>` never closed after that (a thought
    cut off by the token limit) leaves no answer: `(text, None)`. Graders read the final answer
    from the answer part alone; `train.reasoning: strip` trains on it.
    """
    start = _answer_start(text)
    if start is None:
        return text, None
    return (text[:start] if start else None), text[start:]


def _explicit_answer(text: str) -> str | None:
    if boxes := list(_BOX.finditer(text)):
        return _clean(_box_content(text, boxes[-1].end()))
    close = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, close) if close >= 0 else -1
    if start >= 0:
        start += len("<answer>")
        return _clean(text[start : text.index("</answer>", start)])
    hashes = text.rfind("####")
    if hashes >= 0:
        return _clean(text[hashes + 4 :].split("\n", 1)[0].lstrip(" \t"))
    return None


_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")
# `$...$`; an escaped `\$` (a dollar amount) neither opens nor closes one.
_DOLLARS = re.compile(r"\\.|\$((?:\\.|[^$\\])+)\$", re.DOTALL)
_LAST_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")


def _standard_answer(text: str) -> str | None:
    if said := list(_ANSWER_IS.finditer(text)):
        rest = text[said[-1].end() :]
        end = _SENTENCE_END.search(rest)
        answer = _clean((rest[: end.start()] if end else rest).strip().strip("$"))
        if answer:
            return answer
    # The last number, as Qwen2.5-Math's evaluation reads, unless a LaTeX expression ends after
    # it: then the number is part of that expression (the 2 of $\frac{1}{2}$ or of $x^2$).
    found = _last_latex(text)
    if (number := _last(_LAST_NUMBER.finditer(text))) is not None:
        found.append((number.end(), number.group()))
    for _, answer in sorted(found, reverse=True):
        if (answer := _clean(answer)) is not None:
            return answer
    return None


def _last(matches: Iterator[re.Match]) -> re.Match | None:
    last = deque(matches, maxlen=1)
    return last[0] if last else None


def _last_latex(text: str) -> list[tuple[int, str]]:
    """The last `$...$`, `\\(...\\)` and `\\[...\\]`, as (where it ends, its content), each
    found in one pass."""
    found = []
    if dollars := _last(m for m in _DOLLARS.finditer(text) if m.group(1) is not None):
        found.append((dollars.end(), dollars.group(1)))
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        close = text.rfind(closer)
        start = text.rfind(opener, 0, close) if close >= 0 else -1
        if start >= 0:
            found.append((close + len(closer), text[start + len(opener) : close]))
    return found


# `standard` follows the fallback chain of SimpleRL-Zoo's evaluator (Qwen2.5-Math's parser, with
# which the paper's results were graded): the last box, else "the answer is ...", else the last
# number. It differs where that parser misreads a final answer: it takes the whole rest of the
# response after "the answer is" ("The answer is 5. Check: 2+3=5." is wrong there) and prefers
# it to a later "the final answer is"; its last number is the 8 of a closing $\frac{3}{8}$ and
# the 4 of a plain 3/4; and it takes whatever follows an unclosed `\boxed{` (here the chain goes
# on as if there were no box). `<answer>` and `#### N` are explicit answers here, and a reasoning
# model's thought is set aside (split_reasoning); that parser knows neither.
POLICIES = ("strict", "standard")


def _gold_answer(gold: str) -> str | None:
    """Gold may be a bare answer or a worked solution ending in a box or `#### N`."""
    return extract_answer(gold) or _clean(gold)


# --- fast path: normalised strings and plain numbers -----------------------------------------

_TEXT = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"
_NORMALISE = [
    (re.compile(p), r)
    for p, r in [
        (r"\\[dt]frac", r"\\frac"),
        (r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\?\$|~", ""),
        (r"\^\s*\{?\\circ\}?|°", ""),
        (r"\\%", "%"),
        ("\u2212", "-"),
        (r"\{,\}", ","),  # 1{,}000
        # units after a number: 5\text{ cm}^2
        (rf"(\d)(?:\s*{_TEXT}(?:\^\{{?\d\}}?)?)+\s*$", r"\1"),
        (_TEXT, r"\1"),  # other text keeps its words: \text{Monday}
        (r"\\(frac|sqrt)\s*([0-9a-zA-Z])", r"\\\1{\2}"),  # \frac12 -> \frac{1}2, \sqrt2
        (r"(\\frac\{[^{}]*\})\s*([0-9a-zA-Z])", r"\1{\2}"),  # \frac{1}2 -> \frac{1}{2}
        (r"^\\?[a-zA-Z]+\s*=\s*(?=[^=]*$)", ""),  # a leading "x =" when it is the only "="
        (r"\s+", " "),
    ]
]

_DEC = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+"
_NUMBER = re.compile(
    rf"""(?P<sign>[-+]?)\s*
    (?: \\frac\{{\s*(?P<fn>-?(?:{_DEC}))\s*\}}\{{\s*(?P<fd>-?(?:{_DEC}))\s*\}}
      | (?P<sn>{_DEC})\s*/\s*(?P<sd>{_DEC})
      | (?P<d>{_DEC}) )
    \s*(?P<pct>%)?
    (?:\s+[A-Za-z]{{2,}}(?:\^\{{?\d\}}?)?)*  # words after a number: "5 apples", "3 cm^2"
    """,
    re.VERBOSE,
)


def _normalise(answer: str) -> str:
    for pattern, replacement in _NORMALISE:
        answer = pattern.sub(replacement, answer)
    return answer.strip()


def _number(answer: str) -> tuple[set[Fraction], bool] | None:
    """A plain number's possible values ("50%" is 50 or 0.5) and whether it has a decimal point."""
    m = _NUMBER.fullmatch(answer)
    if m is None:
        return None
    parts = [p.replace(",", "") for p in m.group("fn", "fd", "sn", "sd", "d") if p is not None]
    numerator = Fraction(parts[0])
    denominator = Fraction(parts[1]) if len(parts) == 2 else Fraction(1)
    if denominator == 0:
        return None
    value = (-1 if m["sign"] == "-" else 1) * numerator / denominator
    values = {value, value / 100} if m["pct"] else {value}
    return values, any("." in p for p in parts)


def _same_number(a: tuple[set[Fraction], bool], b: tuple[set[Fraction], bool]) -> bool:
    """Exact, unless either side has a decimal point: then to 6 places, as math-verify does."""
    (xs, a_decimal), (ys, b_decimal) = a, b
    if a_decimal or b_decimal:
        xs, ys = {round(x, 6) for x in xs}, {round(y, 6) for y in ys}
    return not xs.isdisjoint(ys)


# --- slow path: math-verify in a worker process ----------------------------------------------


def _mv_equal(pred: str, gold: str) -> bool:
    """Runs in the worker (math-verify and sympy are never imported by the grading process)."""
    from math_verify import parse, verify

    def parsed(answer: str) -> list:
        return parse(f"${answer}$", parsing_timeout=None)

    return verify(parsed(gold), parsed(pred), timeout_seconds=None)


def _serve(conn) -> None:
    """The worker's main loop: answer `(check, pred, gold)` requests until the parent is gone."""
    parent = os.getppid()

    def exit_with_parent() -> None:  # EOF alone misses a parent killed mid-computation
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": by design
    _mv_equal("1", "1")  # import and warm up before the clock runs
    conn.send(True)
    while True:
        try:
            check, pred, gold = conn.recv()
        except EOFError:
            return
        try:
            verdict = bool(check(pred, gold))
        except Exception:  # math-verify catches its own errors; this keeps the worker alive
            verdict = False
        conn.send(verdict)


_WORKER_MAIN = (
    "import sys; from multiprocessing.connection import Connection; "
    "from w2sr.grading import _serve; _serve(Connection(int(sys.argv[1])))"
)


class _Worker:
    """A worker started with `python -c`: multiprocessing's spawn would re-run the caller's
    `__main__` in the child, which breaks scripts without a main guard."""

    def __init__(self) -> None:
        self.conn, child_conn = multiprocessing.Pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(child_conn.fileno())],
            pass_fds=[child_conn.fileno()],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # this w2sr, not another
            start_new_session=True,  # a Ctrl-C is for the parent; the worker follows it out
        )
        child_conn.close()
        try:
            ready = self.conn.poll(_STARTUP_S) and self.conn.recv()
        except EOFError:
            ready = False
        if not ready:
            self.close()
            raise RuntimeError("the math-verify grading worker did not start (see its stderr)")

    def ask(self, pred: str, gold: str) -> bool | None:
        """math-verify's verdict, or None if the worker overran TIMEOUT_S or died."""
        try:
            self.conn.send((_mv_equal, pred, gold))  # sent by reference: tests may swap it
            return self.conn.recv() if self.conn.poll(TIMEOUT_S) else None
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()


_lock = threading.Lock()
_worker: _Worker | None = None


def _forget_worker() -> None:
    """In a forked child the parent's worker and lock are not ours: start afresh."""
    global _lock, _worker
    _lock, _worker = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_worker)


def _slow_equal(pred: str, gold: str) -> bool:
    global _worker
    with _lock:  # one request in flight: the clock starts when the worker gets the check
        if _worker is None:
            _worker = _Worker()
        verdict = _worker.ask(pred, gold)
        if verdict is None:
            logger.warning(
                "math-verify took over %gs or died; counted incorrect: %.200r vs gold %.200r",
                TIMEOUT_S,
                pred,
                gold,
            )
            _worker.close()
            _worker = None
        return bool(verdict)


# --- graders ---------------------------------------------------------------------------------


# Where SimpleRL-Zoo's evaluator (Qwen2.5-Math's `math_equal`) judges otherwise, on purpose: it
# takes any number 100 times or a hundredth of the gold (200 for a gold of 2), where here only a
# side written with % does; it takes numbers within a relative 1e-4 (10001 for 10000), where here
# numbers are exact unless a side has a decimal point (then 6 places, as math-verify); and it
# reads number words ("five" for 5), which math answers seldom are.
def _math_equal(pred: str, gold: str) -> bool:
    if max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip()
    a, b = _normalise(pred), _normalise(gold)
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return _same_number(x, y)
    return _slow_equal(pred, gold)


def is_correct(response: str, gold: str, policy: str = "strict") -> bool:
    """Whether the response's final answer equals the gold answer mathematically."""
    pred, gold_answer = extract_answer(response, policy), _gold_answer(gold)
    return pred is not None and gold_answer is not None and _math_equal(pred, gold_answer)


def exact_match(response: str, gold: str, policy: str = "strict") -> bool:
    """For synthetic tasks whose answers are symbols: the same string, up to outer whitespace."""
    pred = extract_answer(response, policy)
    return pred is not None and pred == _gold_answer(gold)


# Every grader depends on the response only through extract_answer(response, policy):
# grade_batch relies on this to grade each distinct (answer, gold) pair once.
GRADERS: dict[str, Callable[..., bool]] = {"math": is_correct, "exact": exact_match}


def grade_batch(
    responses: Sequence[str], golds: Sequence[str], grader: str = "math", policy: str = "strict"
) -> list[bool]:
    """Grade pairs; samples of one prompt often share an answer, so each distinct pair runs once."""
    check = GRADERS[grader]
    verdicts: dict[tuple[str | None, str], bool] = {}
    out = []
    for response, gold in zip(responses, golds, strict=True):
        key = (extract_answer(response, policy), gold)
        if key not in verdicts:
            verdicts[key] = check(response, gold, policy)
        out.append(verdicts[key])
    return out
