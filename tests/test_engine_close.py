"""Closing an engine: ``Engine.close``, ``Reasoner.close`` and the interpreter's exit stop the engine after its
current unit of work; its running and queued requests end with ``Closed``, and a program that ends during a request
exits with its own code."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.reasoner import Reasoner
from tests.helpers import in_thread

QUESTION = "Which shape moves left?"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds: far above what these requests take; reached only if something hangs


def test_close_ends_running_and_queued_requests_and_refuses_later_ones():
    """``Engine.close``: after its current round the running request's generator is closed (its ``finally`` runs),
    it and the queued one end with ``Closed`` in their consumers (the queued one never starts), the thread ends,
    and a later ``submit`` raises ``Closed``; an engine that never started closes at once."""
    from runtime.engine import TICK, Closed, Engine

    engine = Engine("closing", max_batch=1)
    started, cleaned = threading.Event(), threading.Event()

    def forever(queue_s, running):
        try:
            started.set()
            while True:
                yield TICK
        finally:
            cleaned.set()

    def never(queue_s, running):
        raise AssertionError("a queued request started after close")

    running, queued = engine.submit(forever), engine.submit(never)
    assert started.wait(TIMEOUT)
    assert engine.close(TIMEOUT)
    assert cleaned.is_set()
    for channel in (running, queued):
        with pytest.raises(Closed, match="was closed"):
            list(channel)
    assert engine.running == 0 and engine.waiting == 0 and engine.kv_in_use == 0
    with pytest.raises(Closed, match="was closed"):
        engine.submit(forever)
    assert Engine("never started").close(0)


def test_reasoner_close_stops_a_stream_in_another_thread(engine_dir):
    """``Reasoner.close`` (and ``with``): a stream read on another thread ends with ``runtime.Closed``; later
    requests are refused with it."""
    from runtime import Closed

    with Reasoner.load(engine_dir, backend="ort", reuse_mb=0) as r:
        first = threading.Event()

        def read():
            for _ in r.stream(question=QUESTION, max_new_tokens=1000, template="plain"):
                first.set()

        t, box = in_thread(read)
        assert first.wait(TIMEOUT)
    t.join(TIMEOUT)
    assert isinstance(box.get("error"), Closed), box
    with pytest.raises(Closed):
        r.ask(question=QUESTION, max_new_tokens=4)


@pytest.mark.parametrize("how", ["exits", "raises"])
def test_a_program_that_ends_during_a_request_exits_with_its_own_code(engine_dir, how):
    """A program that exits, or dies of its own exception, while a request is still being decoded: the interpreter's
    exit closes the engine after its current unit of work (``runtime.engine._close_engines``), so the process ends
    with its own exit code. Before, the engine thread was left inside ONNX Runtime's run while the interpreter tore
    down, and the process aborted: "terminate called without an active exception", exit code 134."""
    code = (
        "import sys\n"
        "from runtime import Reasoner\n"
        "r = Reasoner.load(sys.argv[1], backend='ort', reuse_mb=0)\n"
        f"pieces = iter(r.stream(question={QUESTION!r}, max_new_tokens=1000, template='plain'))\n"
        "next(pieces)\n"
        "print('first piece', flush=True)\n"
        f"if {how == 'raises'}:\n"
        "    raise RuntimeError('the app failed mid-stream')\n")
    out = subprocess.run([sys.executable, "-c", code, str(engine_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert "first piece" in out.stdout, out.stderr[-2000:]
    assert "terminate called" not in out.stderr, out.stderr[-2000:]
    if how == "raises":
        assert out.returncode == 1 and out.stderr.rstrip().endswith("RuntimeError: the app failed mid-stream")
    else:
        assert out.returncode == 0, out.stderr[-2000:]
