"""Prompts: the checkpoint's own chat template, rendered in a sandbox, with visual pad tokens expanded.

Two templates of the user turn:
- ``reasoning``: think first, then put the final answer inside <answer>...</answer>;
- ``plain``: only the question (and the visual input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.errors import CheckpointError, InputError

TEMPLATES = ("reasoning", "plain")

REASONING_SUFFIX = (
    "\nThink the question through step by step before answering: write your reasoning between "
    "<think> and </think>, then give only the final answer between <answer> and </answer>."
)

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def user_text(question: str, template: str, options: list[str] | None = None) -> str:
    """The user turn's text. ``verbatim`` (for evaluation protocols that fix the prompt): the question exactly
    as given, not even stripped."""
    if template not in (*TEMPLATES, "verbatim"):
        raise InputError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if not question or not question.strip():
        raise InputError("the question is empty")
    if template == "verbatim":
        return question + ("\nOptions:\n" + "\n".join(options) if options else "")
    text = question.strip()
    if options:
        text += "\nOptions:\n" + "\n".join(options)
    return text + (REASONING_SUFFIX if template == "reasoning" else "")


def load_chat_template(path: str | Path) -> str:
    """The chat template a checkpoint carries (chat_template.jinja, chat_template.json or tokenizer_config.json)."""
    d = Path(path)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            tpl = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(tpl, str):
                return tpl
    raise CheckpointError(f"{d} carries no chat template (chat_template.jinja or tokenizer_config.json)")


def render(chat_template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render in jinja2's immutable sandbox: template text from a checkpoint never runs as code."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise CheckpointError(f"the checkpoint's chat template refused the prompt: {message}")

    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except SecurityError as e:
        raise CheckpointError(f"the chat template tried something the sandbox forbids ({e}); refusing it") from None
    except TemplateError as e:
        raise CheckpointError(f"the chat template is not valid Jinja ({e})") from None


def messages_for(question: str, visual_kinds: list[str], template: str, options: list[str] | None = None) -> list[dict]:
    content = [{"type": k} for k in visual_kinds]
    content.append({"type": "text", "text": user_text(question, template, options)})
    return [{"role": "user", "content": content}]


def expand_pads(text: str, counts: list[tuple]) -> str:
    """Replace each visual's single pad token with as many pads as it has merged tokens, in order.

    An entry is (kind, tokens) or, for a family whose video prompts carry timestamps, ("video", tokens,
    seconds per temporal patch): then the template's ``<|vision_start|><|video_pad|><|vision_end|>`` becomes, for
    each temporal patch, ``<t seconds><|vision_start|>`` + its pads + ``<|vision_end|>`` (t with one decimal),
    as Qwen3-VL's processor writes it."""
    out, rest = [], text
    for kind, n, *times in counts:
        pad = PAD[kind]
        i = rest.find(pad)
        if i < 0:
            raise CheckpointError(f"the chat template produced no {pad} for a {kind} input")
        lo, hi, replacement = i, i + len(pad), pad * n
        if times and times[0]:
            stamps = times[0]
            if n % len(stamps):
                raise ValueError(f"{n} video tokens do not split into {len(stamps)} frames")
            if i >= len(VISION_START) and rest.startswith(VISION_START + pad + VISION_END, i - len(VISION_START)):
                lo, hi = i - len(VISION_START), hi + len(VISION_END)  # the template's pair: each frame has its own
            per = n // len(stamps)
            replacement = "".join(f"<{t:.1f} seconds>{VISION_START}{pad * per}{VISION_END}" for t in stamps)
        out.append(rest[:lo] + replacement)
        rest = rest[hi:]
    return "".join(out) + rest


@dataclass
class Tokenizer:
    """tokenizers-backed tokenizer: light enough for a Jetson, same ids as transformers' fast tokenizer."""

    path: Path

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer as _Tok

        f = Path(self.path) / "tokenizer.json"
        if not f.is_file():
            raise CheckpointError(f"{self.path} has no tokenizer.json")
        self._tok = _Tok.from_file(str(f))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def prompt_ids(tokenizer: Tokenizer, chat_template: str, question: str, visuals: list[tuple],
               template: str = "reasoning", options: list[str] | None = None) -> list[int]:
    """Token ids of one user turn plus the assistant prefix; ``visuals`` is [(kind, merged tokens)] in order
    (with a third item, the timestamps of a video's temporal patches, where the family writes them)."""
    text = render(chat_template, messages_for(question, [v[0] for v in visuals], template, options))
    return tokenizer.encode(expand_pads(text, visuals))
