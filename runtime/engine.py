"""The engine: one thread owns a loaded model's work; requests from any thread are submitted to it and read their
tokens back through a channel of their own.

A ``Reasoner`` holds one ``Engine``. ``Stream.__iter__`` submits its request and reads the channel; the engine's
thread runs the requests one after the other (first in, first out), each to its end or its cancellation,
putting every piece it yields on the request's channel without waiting for the consumer. So:
- a consumer that reads slowly, pauses, or keeps an unfinished stream delays no other request (its pieces
  wait in its channel, at most ``max_new_tokens`` of them);
- a request made inside another stream's loop (nested, from the same thread) waits for the engine's thread,
  which never waits for a consumer: no deadlock;
- a stream that is closed, dropped (its iterator garbage collected) or cancelled is cancelled in the engine
  (after its current token, or before it starts if still queued).
``timings["queue_s"]`` is the time a request waited for the engine's thread.

The engine runs one request at a time (a batch of one): requests that come together are served in turn.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

_ITEM, _ERROR, _DONE = 0, 1, 2


class Channel:
    """One request's pieces, from the engine's thread to its consumer."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, kind: int, value=None) -> None:
        self._q.put((kind, value))

    def __iter__(self) -> Iterator:
        while True:
            try:
                kind, value = self._q.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive in the consumer
            except queue.Empty:
                continue
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return


class AsyncChannel:
    """One request's pieces, from the engine's thread straight to a coroutine on an asyncio event loop (no thread in
    between: each piece is handed to the loop with ``call_soon_threadsafe``). Made on the loop's thread."""

    def __init__(self) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue = asyncio.Queue()

    def put(self, kind: int, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is reading any more
            pass

    async def __aiter__(self):
        while True:
            kind, value = await self._q.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return


class Engine:
    """The thread that runs a model's requests. ``submit(run)`` queues ``run`` (a callable returning the request's
    generator) and returns its ``Channel``. A request runs with the PyTorch thread setting of the thread that
    submitted it (OpenMP keeps that setting per thread)."""

    def __init__(self, name: str = "engine", device=None) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._device = device  # a CUDA device is made the engine thread's current one (it is per thread)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.waiting = 0  # requests queued, not started
        self.running = 0  # requests being run (0 or 1: a batch of one)

    def submit(self, run: Callable[[float], Iterator], channel: Channel | AsyncChannel | None = None
               ) -> Channel | AsyncChannel:
        """``run(queue_s)`` is called on the engine's thread with the seconds the request waited; its pieces go to
        ``channel`` (default: a new ``Channel``), which is returned."""
        import torch

        channel = Channel() if channel is None else channel
        self._ensure_thread()
        with self._start_lock:
            self.waiting += 1
        self._queue.put((run, channel, time.perf_counter(), torch.get_num_threads()))
        return channel

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    @property
    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _serve(self) -> None:
        import torch

        if self._device is not None and torch.device(self._device).type == "cuda":
            torch.cuda.set_device(torch.device(self._device))
        while True:
            run, channel, queued, threads = self._queue.get()
            with self._start_lock:
                self.waiting -= 1
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            self.running = 1
            try:
                for piece in run(time.perf_counter() - queued):
                    channel.put(_ITEM, piece)
            except BaseException as e:  # noqa: BLE001 (the request's error is raised in its consumer)
                channel.put(_ERROR, e)
            finally:
                self.running = 0
                channel.put(_DONE)
                run = channel = None
