"""Prompts: the checkpoint's own chat template, rendered in a sandbox, with visual pad tokens expanded.

Two templates of the user turn:
- ``reasoning``: think first, then put the final answer inside <answer>...</answer>;
- ``plain``: only the question (and the visual input).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from models.checks import read_json_object
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
            tpl = read_json_object(f, CheckpointError).get("chat_template")
            if isinstance(tpl, str):
                return tpl
    raise CheckpointError(f"{d} carries no chat template (chat_template.jinja or tokenizer_config.json)")


def render(chat_template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render in jinja2's immutable sandbox, in a child process capped in memory and time
    (``models.template_sandbox``): template text from a checkpoint never runs as code, and whatever it builds
    cannot exhaust this process."""
    from models.template_sandbox import (
        TEMPLATE_MAX_BYTES,
        TEMPLATE_MAX_CHARS,
        TEMPLATE_MAX_SECONDS,
        TemplateBudgetError,
        TemplateForbidden,
        TemplateRefused,
    )
    from models.template_sandbox import render as render_sandboxed

    try:
        return render_sandboxed(chat_template, messages, add_generation_prompt)
    except TemplateRefused as e:
        raise CheckpointError(f"the checkpoint's chat template refused the prompt: {e}") from None
    except TemplateForbidden as e:
        raise CheckpointError(str(e)) from None
    except TemplateBudgetError:
        raise CheckpointError(f"the chat template went over its budget ({TEMPLATE_MAX_SECONDS:g} s, "
                              f"{TEMPLATE_MAX_CHARS} characters, {TEMPLATE_MAX_BYTES >> 20} MiB) rendering one "
                              "prompt; refusing it") from None


def messages_for(question: str, visual_kinds: list[str], template: str, options: list[str] | None = None) -> list[dict]:
    return _messages(user_text(question, template, options), visual_kinds)


def _messages(text: str, visual_kinds: list[str]) -> list[dict]:
    return [{"role": "user", "content": [*({"type": k} for k in visual_kinds), {"type": "text", "text": text}]}]


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
        try:
            self._tok = _Tok.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            raise CheckpointError(f"{f} is not a readable tokenizer file ({' '.join(str(e).split())[:200]})") from None
        self._text_tok = None
        self._specials: tuple[str, ...] | None = None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, its special tokens' strings (a chat template's markers) parsed as those tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` read as text: a special token's string in it (``<|im_end|>`` typed by a user) becomes
        the ordinary tokens that spell it, never that control token (tokenizers' ``encode_special_tokens``, on a
        second instance, so that ``encode`` from another thread is not affected)."""
        if self._text_tok is None:
            from tokenizers import Tokenizer as _Tok

            tok = _Tok.from_str(self._tok.to_str())
            tok.encode_special_tokens = True
            self._text_tok = tok
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def has_special(self, text: str) -> bool:
        """Whether ``text`` holds the string of a special token (one ``encode`` would turn into a control token)."""
        if self._specials is None:
            self._specials = tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)
        return any(s in text for s in self._specials)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self):
        """A function id -> the text that id adds to the ids before it ('' while a character is incomplete):
        tokenizers' DecodeStream, which decodes only a few trailing ids per step."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token_id: stream.step(self._tok, token_id) or ""

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


_USER_TEXT = f"\ue000user text {secrets.token_hex(8)}\ue001"  # stands in for the user's text while rendering


def prompt_ids(tokenizer: Tokenizer, chat_template: str, question: str, visuals: list[tuple],
               template: str = "reasoning", options: list[str] | None = None) -> list[int]:
    """Token ids of one user turn plus the assistant prefix; ``visuals`` is [(kind, merged tokens)] in order
    (with a third item, the timestamps of a video's temporal patches, where the family writes them).

    The user's text (question and options) is tokenized as text: the template renders around a stand-in for it,
    so a ``<|im_end|>`` typed by a user spells those characters instead of closing the turn, while the
    template's own markers stay control tokens. Text without such strings gets exactly the ids of the whole
    rendered prompt tokenized at once (as transformers' processor tokenizes it)."""
    text = user_text(question, template, options)
    kinds = [v[0] for v in visuals]
    if _USER_TEXT in text:
        raise InputError("the question holds the runtime's private-use marker characters; remove them")
    shell = expand_pads(render(chat_template, _messages(_USER_TEXT, kinds)), visuals)
    parts = shell.split(_USER_TEXT)
    if len(parts) < 2:  # the template rewrote its user text: render the text itself
        if tokenizer.has_special(text):
            raise CheckpointError("the chat template rewrites the user's text, so the control-token strings in the "
                                  "question cannot be kept as text; remove them from the question")
        return tokenizer.encode(expand_pads(render(chat_template, _messages(text, kinds)), visuals))
    if not tokenizer.has_special(text):
        return tokenizer.encode(text.join(parts))
    ids = tokenizer.encode(parts[0])
    for part in parts[1:]:
        ids += tokenizer.encode_text(text) + tokenizer.encode(part)
    return ids
