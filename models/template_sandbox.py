"""A checkpoint's chat template rendered where it can harm nothing: jinja2's immutable sandbox, bounded in time,
output and memory.

The sandbox stops a template from reaching Python objects; what it does not stop is a template that builds a
huge value (``(['x'|center(10**7)]*100)|join``, a list doubled with ``+``, a ``replace`` that multiplies a string).
Checking each operation's result size is a list that can never be complete, so a render runs in a child process
whose address space is capped (``TEMPLATE_MAX_BYTES`` over what it holds when idle) and which is killed past
``TEMPLATE_MAX_SECONDS``: whatever a template builds, it runs out of memory in the child, never in the caller.
One child serves every render of a process, one request at a time (a render takes well under a millisecond);
it is started on the first render and started again after it was killed.

This module imports only the standard library and jinja2 at its top, so the child loads it by path without
importing the project (and PyTorch). Where a child cannot be started or capped (no ``resource`` module, a
platform without ``fork``/``exec``), rendering happens in-process with the per-operation bounds alone.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import threading
import time

TEMPLATE_MAX_CHARS = 1 << 20  # rendered prompt text (a prompt within any export's limits is far shorter)
TEMPLATE_MAX_SECONDS = 2.0  # rendering one prompt
TEMPLATE_MAX_BYTES = 64 << 20  # memory one render may add to the rendering process
_BIG_NUMBER = 10**7  # any larger number handed to a filter or a format width is refused
_START_SECONDS = 30.0  # a child's start (the interpreter and jinja2's import), on a loaded machine


class TemplateBudgetError(Exception):
    """A chat template went over its output, time or memory budget."""


class TemplateRefused(Exception):
    """A chat template called ``raise_exception``: it refuses the messages it was given."""


class TemplateForbidden(Exception):
    """A chat template tried what the sandbox forbids, or failed as Python code."""


def _sandbox():
    """jinja2's immutable sandbox, bounded: a repetition, power, filter argument or format width that would build
    more than ``TEMPLATE_MAX_CHARS`` is refused before it runs (a clear message for the common cases; the
    child's memory cap is what bounds the rest)."""
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
        raise TemplateRefused(str(message))

    env = _sandbox()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template)


def render_here(chat_template: str, messages: list, add_generation_prompt: bool = True) -> str:
    """Render in this process. Raises ``TemplateRefused``, ``TemplateForbidden`` or ``TemplateBudgetError``."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        template = _compiled(chat_template)
        return _render_within_budget(template, {"messages": messages, "add_generation_prompt": add_generation_prompt})
    except SecurityError as e:
        raise TemplateForbidden(f"the chat template tried something the sandbox forbids ({e}); refusing it") from None
    except TemplateError as e:
        raise TemplateForbidden(f"the chat template is not valid Jinja ({e})") from None
    except MemoryError:
        raise TemplateBudgetError("memory") from None
    except (OverflowError, RecursionError, ValueError, TypeError, ArithmeticError) as e:
        raise TemplateForbidden(f"the chat template failed ({type(e).__name__}: {e}); refusing it") from None


# -- the child ----------------------------------------------------------------------------------------------------

def _cap_address_space() -> None:
    """Cap this process's address space at what it maps now plus ``TEMPLATE_MAX_BYTES``."""
    import resource

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + TEMPLATE_MAX_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def serve(stdin=None, stdout=None) -> None:
    """The child's loop: one JSON request a line in, one JSON reply a line out, until its input closes."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    import jinja2  # noqa: F401  (loaded before the cap: the cap is what renders may add)

    _sandbox()
    _cap_address_space()
    stdout.write(json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        try:
            req = json.loads(line)
            reply = {"text": render_here(req["template"], req["messages"], req["add_generation_prompt"])}
        except TemplateRefused as e:
            reply = {"refused": str(e)}
        except TemplateForbidden as e:
            reply = {"forbidden": str(e)}
        except (TemplateBudgetError, MemoryError):
            reply = {"budget": True}
        del line
        try:
            out = json.dumps(reply)
        except MemoryError:
            out = json.dumps({"budget": True})
        stdout.write(out + "\n")
        stdout.flush()


# -- the caller's side ----------------------------------------------------------------------------------------------

class _Child:
    """The rendering child of this process (one request at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc = None
        self.pid = None  # the process that started the child (a forked copy of this one starts its own)
        self.unavailable: str | None = None

    def _start(self) -> None:
        import subprocess

        here = os.path.abspath(__file__)
        code = ("import sys, runpy; sys.path[:] = [p for p in sys.path if p]; "
                f"runpy.run_path({here!r}, run_name='__template_child__')")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=os.path.dirname(here),
                                     close_fds=True, text=True, encoding="utf-8")
        self.pid = os.getpid()
        if self._read(_START_SECONDS) != {"ready": True}:
            self._stop()
            raise OSError("the template rendering process did not start")

    def _stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except Exception:  # already gone
                pass
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass
        self.proc = None

    def _read(self, seconds: float) -> dict | None:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=seconds):
                return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def render(self, chat_template: str, messages: list, add_generation_prompt: bool) -> str:
        with self.lock:
            if self.unavailable is None and (self.proc is None or self.pid != os.getpid() or
                                             self.proc.poll() is not None):
                try:
                    self._start()
                except (OSError, ValueError) as e:
                    self.unavailable = str(e)
            if self.unavailable is not None:
                return render_here(chat_template, messages, add_generation_prompt)
            try:
                self.proc.stdin.write(json.dumps({"template": chat_template, "messages": messages,
                                                  "add_generation_prompt": add_generation_prompt}) + "\n")
                self.proc.stdin.flush()
                reply = self._read(TEMPLATE_MAX_SECONDS + 1.0)
            except (OSError, ValueError):
                reply = None
            if reply is None:  # over time, or the child died (a fresh one serves the next render)
                self._stop()
                raise TemplateBudgetError("time")
        if "text" in reply:
            return reply["text"]
        if "refused" in reply:
            raise TemplateRefused(reply["refused"])
        if "forbidden" in reply:
            raise TemplateForbidden(reply["forbidden"])
        raise TemplateBudgetError("memory")


def _usable() -> bool:
    if os.environ.get("VREASON_TEMPLATE_CHILD", "1") == "0":
        return False
    try:
        import resource  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/proc/self/statm")


_CHILD = _Child()


def render(chat_template: str, messages: list, add_generation_prompt: bool = True) -> str:
    """Render in the capped child (in-process where none can run). Raises ``TemplateRefused``,
    ``TemplateForbidden`` or ``TemplateBudgetError``."""
    if not _usable():
        return render_here(chat_template, messages, add_generation_prompt)
    return _CHILD.render(chat_template, messages, add_generation_prompt)


if __name__ == "__template_child__":
    serve()
