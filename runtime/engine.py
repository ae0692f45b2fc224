"""The engine: one thread owns a loaded model's work; requests from any thread are submitted to it and read their
tokens back through a channel of their own.

A ``Reasoner`` holds one ``Engine``. ``Stream.__iter__`` submits its request and reads the channel. The engine's
thread keeps up to ``max_batch`` requests running at once and advances them in rounds, one unit of work each per
round: a token, a prefill chunk or a vision encoder call (a request's generator yields ``TICK`` where it may be
paused without a piece to give). Of the requests still prefilling, one takes a prefill unit per round
(``prefill_turn``): the one with the fewest prompt tokens left, the first admitted of equals, and one passed over
for later requests in ``PREFILL_AGING`` rounds since its last turn before any other. So the decoding requests wait
at most one prefill chunk (or vision encoder call) a round however many prompts are being prefilled, a short request
started behind a long one gets its first token without waiting for the long one's last, and equal requests started
together get their first tokens one after another rather than all near the end of all their prefills. On its way to
its unit, a request may yield ``Call``s: a step of its work that the engine runs together with the other requests'
calls to the same function, in one call (a decode step of every running request through the trunk, then the head, or
both in one call on ort's fused graphs, ``decode_rows``; V-Reason's updates due at this step and their recomputes: one
pass over the weights for all, where the backend can:
``batch_rows``, every backend with dynamic decode (TensorRT up to its decode profile's batch range), and with static
decode and ``max_batch`` > 1 the torch and ort backends; see ``runtime.pool``). Elsewhere (static decode on
TensorRT) requests take turns and the aggregate rate is the one-request rate.
Requests wait in a first-in, first-out queue for a place (``max_batch``) and for room in the KV budget
(``kv_bytes``: what the running requests' caches hold together, ``kv_cost`` of the bytes each declared when
submitted); one that could never fit is
refused at once (``ResourceError``, one line naming the limit). Every piece is put on the request's channel without
waiting for its consumer, so:
- a consumer that reads slowly, pauses, or keeps an unfinished stream delays no other request (its pieces
  wait in its channel, at most ``max_new_tokens`` of them);
- a request made inside another stream's loop (nested, from the same thread) waits for the engine's thread,
  which never waits for a consumer: no deadlock;
- a stream that is closed, dropped (its iterator garbage collected) or cancelled is cancelled in the engine
  (after its current unit of work, or before it starts if still queued);
- ``Engine.close`` (``Reasoner.close``, and every engine when the interpreter exits) stops the engine after its
  current unit of work: the running and queued requests end with ``Closed``, and the thread ends. So a program that
  exits (or is interrupted) while a request runs waits for one unit of work and exits as it meant to, instead of
  tearing down ONNX Runtime and PyTorch under the engine thread's running graph (which aborted the process).
``timings["queue_s"]`` is the time a request waited for its place; ``timings["batch_mean"]`` the mean number of
requests running while it was advanced. A request with periodic updates (V-Reason's every k-th token) takes its
first step on a round on which the running requests with the same period have theirs (``Running.in_phase``;
``timings["align_s"]``), so that their updates run as one call every k rounds, not one call on every round.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator

_ITEM, _ERROR, _DONE = 0, 1, 2
TICK = None  # what a request's generator yields where it may be paused without a piece for its consumer


EXIT_WAIT_S = 120.0  # how long the interpreter's exit waits for each engine's current unit of work


class Closed(RuntimeError):
    """A request that did not finish because its engine was closed (``Engine.close``: ``Reasoner.close``, or the
    interpreter exiting)."""


_ENGINES: weakref.WeakSet = weakref.WeakSet()  # every engine made in this process (``_close_engines``)


def _close_engines() -> None:
    """At the interpreter's exit: every engine stopped after its current unit of work. The engine threads are daemon
    threads; one left inside a graph's run while the interpreter finalizes has ONNX Runtime's and PyTorch's globals
    destroyed under it, and the process aborts ("terminate called without an active exception", exit code 134) where
    it meant to exit with its own code. A second Ctrl-C during the wait interrupts it."""
    for engine in list(_ENGINES):
        engine.close(EXIT_WAIT_S)


atexit.register(_close_engines)


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
            if not _piece(kind, value):
                return
            yield value


def _fail(channel, error: BaseException) -> None:
    """End a request's channel with ``error``, raised in its consumer."""
    channel.put(_ERROR, error)
    channel.put(_DONE)


def _piece(kind: int, value) -> bool:
    """Whether a channel item is a piece (False: the request's end); raises the request's error."""
    if kind == _ERROR:
        raise value
    return kind == _ITEM


class Call:
    """A step of a request's work that the engine runs together with the other running requests' calls to the same
    ``run`` (one graph call for all: a decode step of every running request, one pass over the weights). A
    request's generator yields it and is sent back its result. ``run(list of args)`` -> list of results."""

    __slots__ = ("run", "args")

    def __init__(self, run: Callable[[list[tuple]], list], *args) -> None:
        self.run, self.args = run, args

    def alone(self):
        return self.run([self.args])[0]


def drain(gen):
    """Run a generator to its end, passing over its ``TICK``s and running its ``Call``s alone; its return value."""
    value = None
    while True:
        try:
            item = gen.send(value)
        except StopIteration as done:
            return done.value
        value = item.alone() if isinstance(item, Call) else None


def alone(gen) -> Iterator:
    """A request's generator run outside the engine's rounds (nested in another request's work): its ``Call``s run
    alone, the rest is passed on."""
    value = None
    while True:
        try:
            item = gen.send(value)
        except StopIteration:
            return
        value = None
        if isinstance(item, Call):
            value = item.alone()
        else:
            yield item


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
            if not _piece(kind, value):
                return
            yield value


class Running:
    """What the engine tells a running request about its turns: ``batch_mean``, the mean number of requests running
    when it was advanced; ``in_phase``, whether this round suits the start of its periodic updates."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.turns = 0
        self.batch_sum = 0
        self._engine = engine
        self.period = 0  # its updates' period, once its first step was let through ``in_phase`` (0: none)
        self.phase = 0  # the round number, modulo ``period``, of that first step
        # prompt tokens it has left to prefill (vision encoder calls included), kept up to date by the request (None:
        # not prefilling, and advanced every round); ``stopped()``: whether it was cancelled (both from ``submit``)
        self.prefill_left: int | None = None
        self.stopped: Callable[[], bool] | None = None
        self.passed_over = 0  # rounds since its last turn in which a request admitted after it had the prefill turn

    @property
    def batch_mean(self) -> float:
        return self.batch_sum / self.turns if self.turns else 1.0

    def in_phase(self, period: int) -> bool:
        """Whether a request whose updates fall on every ``period``-th step from its first may take its first step
        in this round: where other running requests have that period, the rounds on which theirs fall (so that the
        updates run together, one call for all, rather than one call on every round); where none has, any round
        (this one sets the phase). True for ``period`` < 2. Called once per round until True, which records the
        phase on this request (read off the running requests: nothing to release when it finishes)."""
        engine = self._engine
        if period < 2 or engine is None or self.period:
            return True
        here = engine.rounds % period
        if any(row[4].period == period and row[4].phase != here for row in engine._active if row):
            return False
        self.period, self.phase = period, here
        return True


def apart(fn: Callable[[], object]) -> object:
    """``fn()`` run on a thread of its own that ends when it returns: its result returned here, its exception raised
    here. For work that runs PyTorch's parallel CPU kernels outside the engine (loading a model).

    Why: PyTorch's CPU kernels run on libgomp (OpenMP) threads, a pool of them for each thread that ever ran a
    parallel kernel, kept until that thread ends. Once a process holds more OpenMP threads than cores, libgomp
    lets a waiting worker spin about 100 times before it sleeps, in place of about 300,000 (its "throttled" spin
    count), so each of a decode step's parallel kernels (a hundred and more) wakes its workers through the kernel
    again. A load on the caller's thread left such a pool beside the engine thread's for the life of the process:
    on the bench fp32 export (torch backend, 2 cores, 4 clients) decode ran x0.82 of the rate with the engine's
    pool alone (docs/benchmarks.md). The caller's current CUDA device (a per-thread setting) is the thread's too."""
    import torch

    box: dict = {}
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if cuda is not None:
                torch.cuda.set_device(cuda)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (raised again on the caller's thread)
            box["error"] = e

    t = threading.Thread(target=run, name="load", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box.pop("error")
    return box["value"]


PREFILL_AGING = 16  # rounds a prefilling request may be passed over for later ones before it takes the next turn


def prefill_turn(active: list) -> list | None:
    """The running request whose prefill advances this round (None where none is prefilling): the one with the
    fewest prompt tokens left (the first admitted of equals), unless one was passed over for requests admitted after
    it in ``PREFILL_AGING`` rounds since its last turn (the longest passed over then: a long prompt is not held back
    for ever by a run of short ones)."""
    prefilling = [row for row in active if row and row[4].prefill_left is not None]
    if not prefilling:
        return None
    starved = max(prefilling, key=lambda row: row[4].passed_over)
    if starved[4].passed_over >= PREFILL_AGING:
        return starved
    return min(prefilling, key=lambda row: row[4].prefill_left)


class Engine:
    """The thread that runs a model's requests (see the module docstring). ``submit(run, kv=...)`` queues ``run``
    (a callable returning the request's generator) and returns its channel. A request runs with the PyTorch
    thread setting of the thread that submitted it (OpenMP keeps that setting per thread)."""

    def __init__(self, name: str = "engine", device=None, max_batch: int = 1, kv_bytes: int | None = None,
                 kv_cost: Callable[[list[int]], int] | None = None) -> None:
        """``kv_bytes``: the KV budget (None: none); ``kv_cost(kvs)``: the bytes requests that declared ``kvs`` hold
        together (default: their sum; a ``runtime.pool.KVPool``'s rows all have the longest capacity)."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._device = device  # a CUDA device is made the engine thread's current one (it is per thread)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.max_batch = max_batch
        self.kv_budget = kv_bytes  # None: no budget
        self.waiting = 0  # requests queued, not started
        self._active: list[list] = []  # the running requests: [generator, channel, threads, kv, running]
        self.kv_cost = kv_cost or sum
        self.rounds = 0  # rounds run (``_round``; ``Running.in_phase``)
        self.closed = False  # ``close`` was called: no request is taken any more
        _ENGINES.add(self)

    @property
    def kv_in_use(self) -> int:
        """Bytes of KV cache the running requests hold together, as ``kv_cost`` counts what they declared."""
        return self.kv_cost([row[3] for row in self._active if row]) if self._active else 0

    @property
    def running(self) -> int:
        """Requests running (advanced in rounds; their decode steps batched where the backend can)."""
        return len(self._active)

    def submit(self, run: Callable[[float, Running], Iterator], channel: Channel | AsyncChannel | None = None,
               kv: int = 0, threads: int = 0, prefill: int | None = None,
               stopped: Callable[[], bool] | None = None) -> Channel | AsyncChannel:
        """``run(queue_s, running)`` is called on the engine's thread with the seconds the request waited; its
        pieces go to ``channel`` (default: a new ``Channel``), which is returned. ``kv``: the bytes of KV cache
        the request will hold; over the whole budget, ``ResourceError`` at once. ``threads``: the PyTorch threads
        the request runs with (0: the submitting thread's setting). ``prefill``: the prompt tokens it will prefill
        (its ``Running.prefill_left`` when admitted, which the request keeps up to date; None: it takes a turn every
        round); ``stopped()``: whether it was cancelled (a prefilling request waiting for its turn is then resumed at
        once, to leave)."""
        import torch

        alone = self.kv_cost([kv])
        if self.kv_budget is not None and alone > self.kv_budget:
            from models.errors import ResourceError

            raise ResourceError(f"this request needs {alone / 2**20:.1f} MiB of KV cache, over the engine's KV budget "
                                f"kv_mb={self.kv_budget / 2**20:g}; ask for fewer new tokens, use fewer frames, or "
                                "load with a larger kv_mb")
        channel = Channel() if channel is None else channel
        item = (run, channel, time.perf_counter(), threads or torch.get_num_threads(), kv, prefill, stopped)
        with self._start_lock:  # (with ``close``'s: a request is either queued before the close or refused)
            if self.closed:
                raise Closed(f"{self._name} was closed (Reasoner.close): load the model again to ask more")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self.waiting += 1
            self._queue.put(item)
        return channel

    def close(self, timeout: float | None = None) -> bool:
        """Stop the engine after its current unit of work: the running requests' generators are closed (their
        ``finally`` blocks run), they and the queued ones end with ``Closed`` in their consumers, and the thread
        ends; a later ``submit`` raises ``Closed``. Waits for the thread up to ``timeout`` seconds (None: until it
        ends; not when called on the engine's own thread). Returns whether the thread has ended."""
        with self._start_lock:
            self.closed = True
            thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        self._queue.put(None)  # wakes an idle engine
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _fits(self, kv: int, active: list) -> bool:
        if not active:
            return True  # alone it fits (a request over the whole budget was refused when submitted)
        if len(active) >= self.max_batch:
            return False
        return self.kv_budget is None or self.kv_cost([row[3] for row in active if row] + [kv]) <= self.kv_budget

    def _serve(self) -> None:
        import torch

        if self._device is not None and torch.device(self._device).type == "cuda":
            torch.cuda.set_device(torch.device(self._device))
        pending: deque = deque()  # submitted, not yet running (first in, first out)
        while True:
            active = self._active
            got = [self._queue.get()] if not active and not pending and not self.closed else []  # idle: wait
            while True:
                try:
                    got.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending.extend(item for item in got if item is not None)  # (None: ``close``'s wake-up)
            if self.closed:
                self._shut(pending)
                return
            while pending and self._fits(pending[0][4], active):  # admit in order: none overtakes the head
                run, channel, queued, threads, kv, prefill, stopped = pending.popleft()
                running = Running(self)
                running.prefill_left, running.stopped = prefill, stopped
                with self._start_lock:
                    self.waiting -= 1
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                try:
                    gen = run(time.perf_counter() - queued, running)
                except BaseException as e:  # noqa: BLE001 (the request's error is raised in its consumer)
                    _fail(channel, e)
                    continue
                active.append([gen, channel, threads, kv, running])
            self._round(active)

    def _shut(self, pending: deque) -> None:
        """``close``'s end on the engine's thread: each running request's generator closed, and every running and
        queued request's consumer told ``Closed``."""
        error = Closed(f"{self._name} was closed (Reasoner.close, or the interpreter exiting) before this request "
                       "finished: its answer is incomplete")
        for row in self._active:
            gen, channel = row[0], row[1]
            try:
                gen.close()
            except BaseException:  # noqa: BLE001 (a request's own clean-up failing changes nothing here)
                pass
            _fail(channel, error)
            row.clear()
        self._active = []
        for item in pending:
            _fail(item[1], error)
        with self._start_lock:
            self.waiting -= len(pending)

    def _round(self, active: list) -> None:
        """One unit of work of each running request (a piece or a ``TICK``); the ``Call``s they make on the way are
        run together, one run per kind (``Call.run``), and their results sent back, until each has given its
        unit."""
        n = len(active)
        self.rounds += 1
        parked: list = []  # (row, call): requests waiting for their call's result
        turn = prefill_turn(active)
        later = False  # past the turn's row: these were admitted after it
        for row in list(active):
            later = later or row is turn
            running = row[4]
            if running.prefill_left is not None and row is not turn and not (running.stopped and running.stopped()):
                if not later:  # a request admitted after this one has the turn
                    running.passed_over += 1
                continue
            running.passed_over = 0
            running.turns += 1
            running.batch_sum += n
            self._resume(row, None, parked)
        while parked:
            kinds: dict = {}
            for row, call in parked:
                kinds.setdefault(call.run, []).append((row, call))
            parked = []
            for run, members in kinds.items():
                try:
                    results = run([call.args for _, call in members])
                except BaseException as e:  # noqa: BLE001 (each request it served raises it)
                    for row, _ in members:
                        self._resume(row, e, parked, error=True)
                    continue
                for (row, _), result in zip(members, results):
                    self._resume(row, result, parked)

    def _resume(self, row: list, value, parked: list, error: bool = False) -> None:
        """Advance one request until it gives a piece (put on its channel), a ``TICK`` or a ``Call`` (parked);
        ``value``: what it is sent (a call's result; ``error``: an exception it is thrown)."""
        import torch

        gen, channel, threads, _, running = row
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        finished = True
        try:
            piece = gen.throw(value) if error else gen.send(value)
            finished = False
            if isinstance(piece, Call):
                parked.append((row, piece))
            elif piece is not TICK:
                channel.put(_ITEM, piece)
        except StopIteration:
            channel.put(_DONE)
        except BaseException as e:  # noqa: BLE001 (the request's error is raised in its consumer)
            _fail(channel, e)
        if finished:
            self._active = [r for r in self._active if r is not row]
            row.clear()  # the generator and its tensors go now, not at the next request
