"""Scoring the answers of the Video-R1 family of evaluations.

multiple choice: accuracy of the option letter; numerical: MRA (VSI-Bench's mean relative accuracy);
every other type: exact match after normalization.
"""

from __future__ import annotations

import re

from runtime.answer import extract_answer

MRA_THRESHOLDS = [0.50 + 0.05 * i for i in range(10)]  # 0.50, 0.55, ..., 0.95
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[\).:]|$|\s)")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def ground_truth(solution: str) -> str:
    return extract_answer(solution)


def option_letter(answer: str, options: list[str]) -> str | None:
    """The option letter an answer picks: 'B', 'B.', '(B)', 'B) the ball', or an option's text."""
    m = _LETTER.match(answer)
    letters = {o.strip()[0].upper() for o in options if o.strip()}
    if m and (not letters or m.group(1).upper() in letters):
        return m.group(1).upper()
    norm = normalize(answer)
    for o in options:
        body = re.sub(r"^\s*[A-Za-z]\s*[\).:]\s*", "", o)
        if norm and norm == normalize(body):
            return o.strip()[0].upper()
    return None


def parse_number(text: str) -> float | None:
    m = _NUMBER.search(text.replace(" ", ""))
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def mean_relative_accuracy(pred: float | None, gt: float) -> float:
    """Mean over t in {0.50, ..., 0.95} of 1[|pred - gt| / |gt| < 1 - t]; for gt = 0, 1 if pred == 0."""
    if pred is None:
        return 0.0
    if gt == 0:
        return 1.0 if pred == 0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    return sum(rel < 1 - t for t in MRA_THRESHOLDS) / len(MRA_THRESHOLDS)


def normalize(text: str) -> str:
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def score(problem_type: str, answer: str, solution: str, options: list[str] | None = None) -> tuple[str, float]:
    """(metric name, score in [0, 1]) for one sample."""
    gt = ground_truth(solution)
    kind = problem_type.strip().lower()
    if kind == "multiple choice":
        want = option_letter(gt, options or []) or gt.strip().upper()[:1]
        return "acc", float(option_letter(answer, options or []) == want)
    if kind == "numerical":
        g = parse_number(gt)
        if g is None:
            return "mra", 0.0
        return "mra", mean_relative_accuracy(parse_number(answer), g)
    return "exact", float(normalize(answer) == normalize(gt))
