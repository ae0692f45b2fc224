"""Evaluation protocols: how a sample becomes a prompt, which frames and pixels the model is given, and how an
answer is scored.

``video-r1`` (default) reproduces the evaluation of Video-R1 (its ``src/eval_bench.py`` and the
``qwen-vl-utils`` settings it runs with), against which the V-Reason paper reports:
- prompt: a fixed thinking instruction plus one answer-format sentence per problem type, the options listed
  after the question, the question as given (not stripped);
- frames and pixels (``BUDGET``): 2 fps, at least 4 and at most 16 frames, an even count; each video frame
  resized to 128*28*28 pixels (``max(min(128*28*28, total / frames * 2), 1.05 * 128*28*28)`` at most, total
  128000*28*28*0.9), images to 4*28*28 .. 256*28*28;
- scoring (``reward_fn``), on the text inside the first ``<answer>...</answer>`` (the whole output when there
  is none):
    multiple choice  exact equality with the ground-truth letter, after stripping        -> Acc
    numerical        same decimal-ness ('.' or ',' in both or in neither) and equal values
                     rounded to 2 decimals                                                 -> Acc
    regression       mean relative accuracy computed as the script computes it (torch
                     float32, thresholds torch.arange(0.5, 0.975, 0.05), strict '<', 1e-8
                     guard on the denominator)                                             -> MRA
    any other type (OCR, free-form, ...) and any error while scoring                      -> 0
``video-r1-reward`` is the same with Video-R1's *training* reward for OCR (1 - word error rate, clipped) and
free-form answers (mean of ROUGE-1/2/L F-measures, Porter stemming, clipped).
``lenient`` is this project's earlier scoring (option letter or option text, MRA for numerical answers,
normalized exact match otherwise) with its own prompt template (``--template``) and the checkpoint's and
export's frame and pixel settings.
"""

from __future__ import annotations

import re

from models.errors import UserError
from runtime.eval import metrics

PROTOCOLS = ("video-r1", "video-r1-reward", "lenient")
VIDEO_R1 = ("video-r1", "video-r1-reward")

# what Video-R1's evaluation gives the model: its qwen-vl-utils settings (None: the checkpoint's and export's)
BUDGET_KEYS = ("fps", "max_frames", "video_min_pixels", "video_max_pixels", "video_total_pixels",
               "image_min_pixels", "image_max_pixels")
VIDEO_R1_BUDGET = {"fps": 2.0, "max_frames": 16, "video_min_pixels": 128 * 28 * 28,
                   "video_max_pixels": 128 * 28 * 28, "video_total_pixels": int(128000 * 28 * 28 * 0.9),
                   "image_min_pixels": 4 * 28 * 28, "image_max_pixels": 256 * 28 * 28}


def budget(protocol: str, **given) -> dict:
    """The frame and pixel settings of a run: the protocol's defaults, overridden by what is given (not None)."""
    base = dict(VIDEO_R1_BUDGET) if protocol in VIDEO_R1 else dict.fromkeys(BUDGET_KEYS)
    return base | {k: v for k, v in given.items() if v is not None}

# the prompt of Video-R1's evaluation, reproduced word for word (the scores depend on it)
VIDEO_R1_QUESTION = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
    "between the <answer> and </answer> tags."
)
VIDEO_R1_TYPE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
                       "<answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the "
           "<answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
_FIRST_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def check(protocol: str, problem_types: set[str]) -> None:
    """Before any compute: the protocol exists, knows every problem type, and its scorer can be imported."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol in VIDEO_R1:
        unknown = sorted(problem_types - set(VIDEO_R1_TYPE))
        if unknown:
            raise UserError(f"the {protocol} protocol has no prompt for problem type(s) {', '.join(unknown)}; "
                            f"it knows {', '.join(VIDEO_R1_TYPE)} (or use --protocol lenient)")
        if protocol == "video-r1-reward" and "free-form" in problem_types:
            rouge_scorer()


def video_r1_prompt(problem: str, problem_type: str, options: list[str]) -> str:
    question = problem
    if problem_type == "multiple choice":
        question = problem + "Options:\n" + "".join(op + "\n" for op in options)
    return VIDEO_R1_QUESTION.format(Question=question) + VIDEO_R1_TYPE[problem_type]


def first_answer(text: str) -> str:
    """The text inside the first <answer>...</answer>, stripped; '' when there is none."""
    m = _FIRST_ANSWER.search(text)
    return m.group(1).strip() if m else ""


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def video_r1_mra(pred: float, gt: float) -> float:
    """Mean relative accuracy in the script's own arithmetic: torch float32 tensors, thresholds from
    ``torch.arange`` (numpy's float32 arange differs by an ulp at some thresholds, which flips boundary cases
    such as 9 against 10)."""
    import torch

    p, g = torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)
    rel = torch.abs(p - g) / (torch.abs(g) + 1e-8)
    thresholds = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)
    return (rel < (1 - thresholds)).float().mean().item()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's word count (at least 1)."""
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = prev[j - 1] if r == h else 1 + min(prev[j], cur[j - 1], prev[j - 1])
        prev = cur
    return prev[-1] / max(1, len(ref))


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise UserError("free-form answers are scored with ROUGE (the video-r1 protocol): "
                        "pip install rouge-score (or the project's [eval] extra), or use --protocol lenient") from None
    return rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def video_r1_score(problem_type: str, output: str, solution: str, reward: bool = False) -> tuple[str, float]:
    """``reward_fn`` of Video-R1's evaluation; ``reward``: OCR and free-form scored with its training reward
    (word error rate, ROUGE) instead of 0."""
    metric = "mra" if problem_type == "regression" else "acc"
    try:
        out = first_answer(output) or output
        gt = first_answer(solution)
        if problem_type == "multiple choice":
            return metric, float(out.strip() == gt.strip())
        if problem_type == "numerical":
            if ("." in gt or "," in gt) != ("." in out or "," in out):
                return metric, 0.0
            g, o = _number(gt), _number(out)
            if g is None or o is None:
                return metric, 0.0
            return metric, float(round(g, 2) == round(o, 2))
        if problem_type == "regression":
            g, o = _number(gt), _number(out)
            return metric, 0.0 if g is None or o is None else video_r1_mra(o, g)
        if problem_type == "OCR" and reward:
            return metric, max(0.0, min(1.0, 1.0 - word_error_rate(gt, out)))
        if problem_type == "free-form" and reward:
            s = rouge_scorer().score(gt, out)
            return metric, max(0.0, min(1.0, (s["rouge1"].fmeasure + s["rouge2"].fmeasure
                                               + s["rougeL"].fmeasure) / 3))
        return metric, 0.0
    except Exception:  # the protocol scores any failure as 0
        return metric, 0.0


def prompt(protocol: str, problem: str, problem_type: str, options: list[str]) -> tuple[str, list[str] | None, str]:
    """(question text, options for the template, template) the Reasoner is asked with."""
    if protocol in VIDEO_R1:  # the question exactly as the script sends it
        return video_r1_prompt(problem, problem_type, options), None, "verbatim"
    return problem, options or None, ""


def score(protocol: str, problem_type: str, output: str, answer: str, solution: str,
          options: list[str]) -> tuple[str, float]:
    if protocol in VIDEO_R1:
        return video_r1_score(problem_type, output, solution, reward=protocol == "video-r1-reward")
    return metrics.score(problem_type, answer, solution, options)
