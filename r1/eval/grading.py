"""Grading one output against a gold answer: the last \\boxed{} of the answer, checked by math-verify.

Owns where the final answer is taken from (the text after `</think>`, else the whole output; the
last box in it), the equivalence check (math-verify: fractions, decimals, LaTeX, intervals, sets,
units in \\text{}), the key samples vote with for cons@K, and the hard time limit per item: the
check runs in a worker process that is killed and restarted when it overruns, so one pathological
answer (say 9^{9^{9^9}}) costs seconds, never the run. It does not own prompts or metrics.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
from dataclasses import dataclass

# math-verify's own limits (signal based) fire first; the worker's hard limit backs them up for
# work that signals cannot interrupt.
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
HARD_TIMEOUT_S = 2 * (2 * PARSE_TIMEOUT_S + VERIFY_TIMEOUT_S)  # two parses and a verify, doubled
STARTUP_TIMEOUT_S = 120  # importing sympy and math-verify on a busy machine

BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the content of the last box; None when there is none
    correct: bool
    vote_key: str | None  # equal for answers math-verify parses to the same value
    error: str | None = None  # "timeout" or the checker's exception, when grading failed


def answer_section(text: str) -> str:
    """The part of an output that holds the final answer: after the last </think>, else all of it."""
    _, tag, after = text.rpartition("</think>")
    return after if tag else text


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in text, braces matched."""
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    while start >= 0:
        cmd = next(c for c in BOX_COMMANDS if text.startswith(c, start))
        content = _box_content(text, start + len(cmd))
        if content is not None:
            return content.strip()
        # An unclosed box (output cut off inside it) does not count: look at the one before.
        start = max(text.rfind(c, 0, start) for c in BOX_COMMANDS)
    return None


def _box_content(text: str, i: int) -> str | None:
    if text.startswith(" ", i):  # `\boxed 5`: the next word
        words = text[i:].split(maxsplit=1)
        return words[0].rstrip("$.") if words else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "{}" and text[j - 1] != "\\":  # \{ and \} are set braces, not grouping
            depth += 1 if text[j] == "{" else -1
            if depth == 0:
                return text[i + 1 : j]
    return None


def check(extracted: str, gold: str) -> tuple[bool, str]:
    """(math-verify's equivalence of the two, the vote key of the extracted answer). In process."""
    from math_verify import parse, verify
    from math_verify.parser import LatexExtractionConfig

    # Both sides go through the same boxed-LaTeX parser, so "\frac12" and "0.5" meet as 1/2.
    config = [LatexExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=PARSE_TIMEOUT_S)
    pred_parsed = parse(f"\\boxed{{{extracted}}}", extraction_config=config, parsing_timeout=PARSE_TIMEOUT_S)
    if gold_parsed and pred_parsed:
        correct = verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S)
    else:  # something math-verify cannot read (a name, a word): compare the text itself
        correct = _squeeze(extracted) == _squeeze(gold)
    return correct, vote_key(extracted, pred_parsed)


def vote_key(extracted: str, parsed: list) -> str:
    """What majority voting compares: the parsed value when there is one, else the squeezed text."""
    return str(parsed[0]) if parsed else _squeeze(extracted)


def _squeeze(text: str) -> str:
    return "".join(text.split())


class Grader:
    """Grades outputs in a worker process with a hard time limit; use as a context manager."""

    def __init__(self, timeout_s: float = HARD_TIMEOUT_S):
        if importlib.util.find_spec("math_verify") is None:
            raise RuntimeError("grading needs math-verify: pip install math-verify (or 'r1[eval]')")
        self.timeout_s = timeout_s
        self._proc = None
        self._conn = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def grade(self, output: str, gold: str) -> Grade:
        extracted = last_boxed(answer_section(output))
        if extracted is None:
            return Grade(None, False, None)
        try:
            correct, key, error = self._ask(extracted, gold)
        except TimeoutError:
            return Grade(extracted, False, vote_key(extracted, []), "timeout")
        except (EOFError, OSError) as e:  # the worker died (say, out of memory): restart next time
            self.close()
            return Grade(extracted, False, vote_key(extracted, []), f"grader died: {type(e).__name__}")
        return Grade(extracted, correct, key, error)

    def _ask(self, extracted: str, gold: str) -> tuple[bool, str, str | None]:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send((extracted, gold))
        if not self._conn.poll(self.timeout_s):
            self.close()  # the worker is stuck: kill it; the next item starts a fresh one
            raise TimeoutError
        return self._conn.recv()

    def _start(self) -> None:
        # fork shares the already-imported modules; spawn (where fork is missing) re-imports them.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._conn), daemon=True, name="r1-eval-grader")
        self._proc.start()
        child.close()
        # The item clock starts once the worker is warm, so imports never count as an item's time.
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the grading worker did not start within {STARTUP_TIMEOUT_S} s")
        ready = self._conn.recv()
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the grading worker failed to start: {ready}")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None


def _serve(conn, parent_end) -> None:
    """The worker loop: warm up, then grade until the parent closes the pipe (or dies)."""
    parent_end.close()  # else the pipe never reports EOF when the parent is killed
    try:
        check("1", "1")
    except Exception as e:  # most likely math-verify is not installed
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    while True:
        try:
            extracted, gold = conn.recv()
        except EOFError:
            return
        try:
            correct, key = check(extracted, gold)
            conn.send((correct, key, None))
        except Exception as e:  # a checker bug on one item is that item's failure, not the run's
            conn.send((False, vote_key(extracted, []), f"{type(e).__name__}: {e}"))
