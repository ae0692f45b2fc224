"""Prompts: the checkpoint's own chat template, rendered in a sandbox, with visual pad tokens expanded.

Two templates of the user turn:
- ``reasoning``: think first, then put the final answer inside <answer>...</answer>;
- ``plain``: only the question (and the visual input).
"""

from __future__ import annotations

import functools
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


TEMPLATE_MAX_CHARS = 1 << 20  # rendered prompt text (a prompt within any export's limits is far shorter)
TEMPLATE_MAX_SECONDS = 2.0  # rendering one prompt
_BIG_NUMBER = 10**7  # any larger number handed to a filter or a format width is refused


class TemplateBudgetError(Exception):
    """A chat template went over its output or time budget."""


def _sandbox():
    """jinja2's immutable sandbox, bounded: a repetition, power, filter argument or format width that would build
    more than ``TEMPLATE_MAX_CHARS`` is refused before it runs."""
    import re

    from jinja2.exceptions import SecurityError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    wide = re.compile(r"\d{8,}")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise SecurityError(f"repetition to {len(seq) * n} items is over the template budget")
            if operator == "%" and isinstance(left, str) and wide.search(left):
                raise SecurityError("a format width this large is over the template budget")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256 \
                    and isinstance(left, (int, float)) and abs(left) not in (0, 1):
                raise SecurityError("a power this large is over the template budget")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is not None and isinstance(getattr(value, "__self__", None), str) and wide.search(value.__self__):
                raise SecurityError("a format width this large is over the template budget")
            return fmt

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def bounded(name, fn):
        def call(*args, **kwargs):
            for x in (*args, *kwargs.values()):
                if (isinstance(x, int) and not isinstance(x, bool) and abs(x) > _BIG_NUMBER) or \
                        (name == "format" and isinstance(x, str) and wide.search(x)):
                    raise SecurityError(f"filter {name} with {str(x)[:20]} is over the template budget")
            return fn(*args, **kwargs)
        for attr in ("jinja_pass_arg",):  # keep how jinja passes the environment or context to the filter
            if hasattr(fn, attr):
                setattr(call, attr, getattr(fn, attr))
        return call

    env.filters = {k: bounded(k, f) for k, f in env.filters.items()}
    return env


def _too_big(frame) -> bool:
    from jinja2.utils import Namespace

    for v in frame.f_locals.values():
        if isinstance(v, str) and len(v) > TEMPLATE_MAX_CHARS:
            return True
        if isinstance(v, Namespace):
            if any(isinstance(x, str) and len(x) > TEMPLATE_MAX_CHARS
                   for x in object.__getattribute__(v, "_Namespace__attrs").values()):
                return True
    return False


def _render_within_budget(template, context: dict) -> str:
    """Render, stopping (``TemplateBudgetError``) past ``TEMPLATE_MAX_SECONDS`` or ``TEMPLATE_MAX_CHARS``: a line
    tracer on the template's own compiled code checks the clock and its strings' sizes as it runs."""
    import sys
    import time

    deadline = time.monotonic() + TEMPLATE_MAX_SECONDS
    filename = template.root_render_func.__code__.co_filename

    def local(frame, event, arg):
        if event == "line" and (time.monotonic() > deadline or _too_big(frame)):
            raise TemplateBudgetError("over its time or size budget")
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        out, n = [], 0
        for piece in template.generate(**context):
            n += len(piece)
            if n > TEMPLATE_MAX_CHARS or time.monotonic() > deadline:
                raise TemplateBudgetError("over its time or size budget")
            out.append(piece)
        return "".join(out)
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=8)
def _compiled(chat_template: str):
    """The template compiled once (per text) in its bounded sandbox."""

    def raise_exception(message):
        raise CheckpointError(f"the checkpoint's chat template refused the prompt: {message}")

    env = _sandbox()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template)


def render(chat_template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render in jinja2's immutable sandbox: template text from a checkpoint never runs as code, and rendering is
    bounded in time (``TEMPLATE_MAX_SECONDS``) and output (``TEMPLATE_MAX_CHARS``)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        template = _compiled(chat_template)
        return _render_within_budget(template, {"messages": messages, "add_generation_prompt": add_generation_prompt})
    except SecurityError as e:
        raise CheckpointError(f"the chat template tried something the sandbox forbids ({e}); refusing it") from None
    except TemplateError as e:
        raise CheckpointError(f"the chat template is not valid Jinja ({e})") from None
    except TemplateBudgetError:
        raise CheckpointError(f"the chat template went over its budget ({TEMPLATE_MAX_SECONDS:g} s, "
                              f"{TEMPLATE_MAX_CHARS} characters) rendering one prompt; refusing it") from None
    except (OverflowError, MemoryError, RecursionError, ValueError, TypeError, ArithmeticError) as e:
        raise CheckpointError(f"the chat template failed ({type(e).__name__}: {e}); refusing it") from None


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
        try:
            self._tok = _Tok.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            raise CheckpointError(f"{f} is not a readable tokenizer file ({' '.join(str(e).split())[:200]})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

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


def prompt_ids(tokenizer: Tokenizer, chat_template: str, question: str, visuals: list[tuple],
               template: str = "reasoning", options: list[str] | None = None) -> list[int]:
    """Token ids of one user turn plus the assistant prefix; ``visuals`` is [(kind, merged tokens)] in order
    (with a third item, the timestamps of a video's temporal patches, where the family writes them)."""
    text = render(chat_template, messages_for(question, [v[0] for v in visuals], template, options))
    return tokenizer.encode(expand_pads(text, visuals))
