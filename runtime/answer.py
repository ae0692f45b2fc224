"""The final answer inside <answer>...</answer>, with fallbacks for answers that miss the tags."""

from __future__ import annotations

import re

_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OPEN = re.compile(r"<answer>(.*)$", re.S | re.I)
_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*(.+)", re.I)


def extract_answer(text: str) -> str:
    """The last <answer>...</answer> block; else an unclosed <answer> tail; else 'answer: X'; else the
    text after a closing </think>; else the whole text, stripped."""
    found = _TAG.findall(text)
    if found:
        return found[-1].strip()
    m = _OPEN.search(text)
    if m and m.group(1).strip():
        return m.group(1).strip()
    phrases = list(_PHRASE.finditer(text))
    if phrases:
        return phrases[-1].group(1).strip().splitlines()[0].strip()
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return text.strip()
