"""Standing questions over the latest window of a live video source (``Reasoner.watch``; the command is
``python -m runtime.watch``).

A capture thread reads the source (a video file, a folder of frames, a camera index, or an RTSP/HTTP URL:
whatever OpenCV opens) and keeps frames sampled at ``--fps`` in a ring buffer holding one window; it is never
blocked by the model. Every ``--every`` seconds of stream time (a tick) each question is asked about the latest
window; a tick that comes while the model is still answering the previous one is skipped and counted, never
queued. Consecutive windows share frames, and questions share the clip: the Reasoner's reuse store
(``reuse_mb``) skips the vision encoding and prefill they have in common.

One dict (the command: one JSON line) per answer: event ("answer"), timestamp (wall clock, UTC, ISO 8601),
source, window_start_s, window_end_s (stream time), question, answer, text, ttft_s, total_s,
reused_prompt_tokens, skipped_ticks, dropped_frames and reconnects (running totals), alert (the trigger matched
the answer), entropy_mean. A live source's health is reported in lines of their own: event "reconnecting"
(attempt, of, wait_s), "reconnected" (reconnects) and "gave_up" (attempts, message), each with source and
timestamp. Every argument and question is checked before capture starts; a source that ends before its first
window fills is refused (``SourceError``), not answered with nothing. Stream time is the frame's own time for a file
(read at its frame rate, as if live, unless ``realtime=False``) and a folder (``fps`` images per second), and
seconds since the first frame for a camera or URL. dropped_frames counts sampled frames no answered window
contained: frames that left the ring before a tick used them, and samples a live source did not deliver
(reconnects, stalls). A live source that stops or fails is reopened with backoff; after ``reconnect`` failures
in a row, ``SourceError``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models import checks
from models.errors import InputError, SourceError, UserError
from models.video import _cv2, frame_files, read_image

BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0
URL_TIMEOUT_S = 5.0  # opening a URL source, and each read from it


@dataclass
class Frame:
    t: float  # stream time, seconds
    rgb: np.ndarray
    seq: int  # sample number


def source_kind(src: str) -> str:
    if src.isdigit():
        return "camera"
    if "://" in src:
        return "url"
    p = Path(src).expanduser()
    if p.is_dir():
        return "folder"
    if p.is_file():
        return "file"
    raise InputError(f"--source {src}: not a video file, a folder of frames, a camera index or a URL")


class Capture:
    """Reads a source on its own thread into a ring buffer of the last ``size`` frames sampled at ``fps``.

    ``realtime`` (files and folders): frames are released at their own rate, as a camera would; off, the reader
    waits until the consumer has used the window (offline use: every tick answered, nothing skipped)."""

    def __init__(self, src: str, fps: float, size: int, realtime: bool = True, reconnect: int = 5,
                 backoff_s: float = BACKOFF_S, loop: bool = False) -> None:
        self.src, self.kind = src, source_kind(src)
        self.live = self.kind in ("camera", "url")
        self.loop = loop and not self.live  # a file or folder played again from its start, stream time going on
        self.fps, self.size, self.realtime = fps, size, realtime or self.live
        self.reconnect, self.backoff_s = reconnect, backoff_s
        self.ring: deque[Frame] = deque()
        self.cond = threading.Condition()
        self.now = -math.inf  # stream time of the newest frame read
        self.ended = False
        self.error: str | None = None
        self.dropped = 0  # sampled frames no answered window contained
        self.reconnects = 0
        self.health: deque[dict] = deque()  # reconnecting / reconnected / gave_up, for the consumer to report
        self._used = -1  # newest sample number an answered window contained
        self._next_t = 0.0  # stream time of the next sample
        self._seq = 0
        self._pending_t = -math.inf  # offline: the stream time the consumer waits for (the reader stops there)
        self._down = False  # a live source is being reopened
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    # -- the reader thread --------------------------------------------------------------------------------------

    def start(self) -> Capture:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        with self.cond:
            self.cond.notify_all()
        if wait and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            if self.kind == "folder":
                self._read_folder()
            else:
                self._read_capture()
        except UserError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 (a reader failure ends the watch with one line, not a thread trace)
            self.error = f"reading {self.src} failed: {type(e).__name__}: {e}"
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def _read_folder(self) -> None:
        files = frame_files(self.src)
        start, i = time.monotonic(), 0
        while True:
            for f in files:
                t = i / self.fps
                if not self._pace(start, t):
                    return
                self._offer(t, read_image(f))
                i += 1
            if not self.loop:
                return

    def _open(self):
        cv2 = _cv2()
        if self.kind == "url":  # a server that accepts and then says nothing must not hold the reader for long
            ms = int(1000 * URL_TIMEOUT_S)
            cap = cv2.VideoCapture(self.src, cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            cap = cv2.VideoCapture(int(self.src) if self.kind == "camera" else str(Path(self.src).expanduser()))
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _read_capture(self) -> None:
        cv2 = _cv2()
        failures, start, i = 0, None, 0
        while not self._stop.is_set():
            cap = self._open()
            if cap is None and not self.live:
                raise SourceError(f"video {self.src} could not be opened; is it a video file OpenCV can decode?")
            rate = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if cap is not None else 0.0
            rate = rate if 0 < rate < 1000 else 30.0
            got = 0
            try:
                while cap is not None and not self._stop.is_set():
                    ok, bgr = cap.read()
                    if not ok or bgr is None:
                        break
                    now = time.monotonic()
                    if start is None:
                        start = now
                    t = i / rate if not self.live else now - start
                    if not self.live and not self._pace(start, t):
                        return
                    i += 1
                    got += 1
                    failures = 0
                    if self._down:  # the first frame after a reconnect
                        self._down = False
                        self._note("reconnected", reconnects=self.reconnects)
                    self._offer(t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            finally:
                if cap is not None:
                    cap.release()
            if not self.live:
                if got == 0:
                    if i == 0:
                        raise SourceError(f"video {self.src} has no frames OpenCV can read")
                    return  # played again, it gave nothing more
                if not self.loop:
                    return  # a file ends
                continue
            failures += 1
            if failures > self.reconnect:
                why = (f"source {self.src} stopped and {self.reconnect} reopening{'s' if self.reconnect != 1 else ''} "
                       f"in a row failed: gave up (--reconnect {self.reconnect})") if self.reconnect else \
                    f"source {self.src} stopped: gave up without reopening it (--reconnect 0)"
                self._note("gave_up", attempts=failures - 1, message=why)
                raise SourceError(why)
            delay = min(BACKOFF_MAX_S, self.backoff_s * 2 ** (failures - 1))
            self._note("reconnecting", attempt=failures, of=self.reconnect, wait_s=delay)
            self.reconnects += 1
            self._stop.wait(delay)
            self._down = True

    @property
    def samples(self) -> int:
        """Frames sampled into the ring so far."""
        return self._seq

    def _note(self, event: str, **fields) -> None:
        """A source health event, reported by ``watch`` as a line of its own."""
        with self.cond:
            self.health.append({"event": event, "source": self.src, "timestamp": wall_clock(), **fields})
            self.cond.notify_all()

    def _pace(self, start: float, t: float) -> bool:
        """Hold a file or folder frame until its time (realtime), or until the consumer caught up (offline);
        False once stopped."""
        if self.realtime:
            delay = start + t - time.monotonic()
            return not (delay > 0 and self._stop.wait(delay))
        with self.cond:
            while self.now >= self._pending_t and not self._stop.is_set():
                self.cond.wait(0.5)
        return not self._stop.is_set()

    def _offer(self, t: float, rgb: np.ndarray) -> None:
        """Keep the frame when a sample is due (one per 1 / fps of stream time)."""
        with self.cond:
            self.now = t
            if t + 1e-9 < self._next_t:
                self.cond.notify_all()
                return
            missed = int((t - self._next_t) * self.fps + 1e-6)  # whole sample intervals that brought no frame
            if self.live:  # samples a stalled or reconnecting live source did not deliver
                self.dropped += missed
            self._next_t += (missed + 1) / self.fps
            self.ring.append(Frame(t, rgb, self._seq))
            self._seq += 1
            while len(self.ring) > self.size:
                old = self.ring.popleft()
                if old.seq > self._used:
                    self.dropped += 1
            self.cond.notify_all()

    # -- the consumer -------------------------------------------------------------------------------------------

    def wait_for(self, t: float, timeout: float | None = None) -> bool:
        """Block until stream time reaches ``t`` with a full window (or the source ended); offline, let the reader
        run up to ``t`` and no further. False when the source ended first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._pending_t = t
            self.cond.notify_all()
            while not (self.now >= t - 1e-9 and len(self.ring) >= self.size) and not self.ended:
                if self.health and timeout is not None:
                    return False  # a health event to report first
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(0.5 if left is None else min(0.5, left))
            return self.now >= t - 1e-9 and len(self.ring) >= self.size

    def window(self) -> list[Frame]:
        with self.cond:
            frames = list(self.ring)
            if frames:
                self._used = max(self._used, frames[-1].seq)
            return frames

    def release(self) -> None:
        """Offline: the window was answered; the reader may go on to the next tick."""
        with self.cond:
            self._pending_t = -math.inf
            self.cond.notify_all()


def wall_clock() -> str:
    """Now, UTC, ISO 8601 to the millisecond: the ``timestamp`` of every line."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Window:
    """The frames of one tick, and the ticks skipped so far (they came while the model was answering)."""

    frames: list[Frame]
    skipped: int


def ticks(cap: Capture, every: float, max_windows: int | None = None) -> Iterator[dict | Window]:
    """The source's health events (dicts) and, every ``every`` seconds of stream time, its latest window; the
    caller answers a window before taking the next item. A tick that comes while the caller is still answering
    is skipped and counted, never queued. Ends when the source ends or fails (``cap.error``), or after
    ``max_windows`` windows."""
    skipped, answered, tick = 0, 0, cap.size / cap.fps - 0.5 / cap.fps  # the first tick: the first window is full
    while max_windows is None or answered < max_windows:
        if answered and cap.realtime and cap.now >= tick:  # ticks that came while the model was answering
            late = math.floor((cap.now - tick) / every + 1e-9) + 1
            skipped += late
            tick += late * every
        while True:
            ready = cap.wait_for(tick, timeout=0.5)
            while cap.health:
                yield cap.health.popleft()
            if ready or cap.ended:
                break
        if not ready or cap.error:
            return
        yield Window(cap.window(), skipped)
        answered += 1
        tick += every
        cap.release()


def answer_line(source: str, window: Window, question: str, res, total_s: float, cap: Capture, alert: bool) -> dict:
    """One answer as ``watch`` reports it (the keys in the module docstring)."""
    frames = window.frames
    return {
        "event": "answer", "timestamp": wall_clock(),
        "source": source, "window_start_s": round(frames[0].t, 3), "window_end_s": round(frames[-1].t, 3),
        "question": question, "answer": res.answer, "text": res.text, "ttft_s": res.timings["ttft_s"],
        "total_s": total_s, "reused_prompt_tokens": res.timings["reused_prompt_tokens"],
        "skipped_ticks": window.skipped, "dropped_frames": cap.dropped, "reconnects": cap.reconnects,
        "alert": alert, "entropy_mean": float(np.mean(res.entropy)) if res.entropy else 0.0,
    }


WATCH_MAX_NEW_TOKENS, WATCH_TEMPLATE = 64, "plain"  # short answers to standing questions; the CLI's defaults too


def check_requests(reasoner, questions: list[str], fps: float, size: int, method: str, max_new_tokens: int,
                   template: str, ask: dict) -> None:
    """Every question as a request on a window of ``size`` small frames, before capture starts: a bad argument or
    a question too long for the export is refused now, not once the first window has filled. (A window of the
    source's real frames can still be over the prompt limit; that is refused when it comes.)"""
    import inspect

    from controller.config import METHODS

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "base" and hasattr(reasoner, "controller_config"):
        reasoner.controller_config(ask.get("controller"))
    sampling = ask.get("sampling")
    if sampling is not None:
        sampling.validate()
    prepare = getattr(reasoner, "prepare", None)
    if prepare is None:
        return
    known = inspect.signature(prepare).parameters
    # what each answer's request takes: ``stream``'s own keywords and, through its ``**visual``, ``prepare``'s
    own = inspect.signature(reasoner.stream).parameters.items()
    takes = {n for n, p in own if p.kind != p.VAR_KEYWORD} | set(known)
    unknown = [k for k in ask if k not in takes]
    if unknown:  # (as Python says it of any call; else it came only once the first window had filled)
        raise TypeError(f"watch() got an unexpected keyword argument {unknown[0]!r}")
    extra = {k: v for k, v in ask.items() if k in known}
    blank = [np.zeros((64, 64, 3), np.uint8)] * size
    for q in questions:
        prepare(question=q, frames=blank, fps=fps, template=template, max_new_tokens=max_new_tokens, **extra)


def watch(reasoner, source: str, questions: list[str], window: float, every: float, fps: float = 2.0,
          method: str = "base", trigger: str | None = None, max_windows: int | None = None,
          realtime: bool = True, reconnect: int = 5, max_new_tokens: int = WATCH_MAX_NEW_TOKENS,
          template: str = WATCH_TEMPLATE, **ask) -> Iterator[dict]:
    """Answer each question on the latest ``window`` seconds of ``source`` every ``every`` seconds; yields one dict
    per answer (``"event": "answer"``, the JSON line ``python -m runtime.watch`` writes) and one per source health
    event (``"event"``: ``reconnecting``, ``reconnected`` or ``gave_up``). See the module docstring."""
    window = checks.check_number("window", window, lo=0, lo_open=True, hi=3600)
    every = checks.check_number("every", every, lo=0, lo_open=True, hi=3600)
    fps = checks.check_number("fps", fps, lo=0, lo_open=True, hi=60)
    checks.check_number("max_windows", max_windows, lo=1, integer=True, optional=True)
    checks.check_number("reconnect", reconnect, lo=0, integer=True)
    if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise InputError("give at least one non-empty question")
    try:
        pattern = re.compile(trigger, re.IGNORECASE) if trigger else None
    except re.error as e:
        raise InputError(f"--trigger {trigger!r} is not a regular expression: {e}") from None
    size = max(1, round(window * fps))
    check_requests(reasoner, questions, fps, size, method, max_new_tokens, template, ask)
    cap = Capture(source, fps, size, realtime=realtime, reconnect=reconnect).start()
    answered = 0
    try:
        for item in ticks(cap, every, max_windows):
            if isinstance(item, dict):  # a source health event
                yield item
                continue
            for q in questions:
                t0 = time.perf_counter()
                res = reasoner.ask(frames=[f.rgb for f in item.frames], fps=fps, question=q, method=method,
                                   max_new_tokens=max_new_tokens, template=template, **ask)
                yield answer_line(source, item, q, res, time.perf_counter() - t0, cap,
                                  bool(pattern.search(res.answer)) if pattern else False)
            answered += 1
    finally:
        cap.stop()
    while cap.health:
        yield cap.health.popleft()
    if cap.error:
        raise SourceError(cap.error)
    if answered == 0 and cap.ended:
        raise SourceError(f"source {source} ended after {cap.samples} sampled frame{'s' if cap.samples != 1 else ''} "
                          f"({max(cap.now, 0.0):.1f} s), before a {window:g} s window at {fps:g} fps ({size} frames) "
                          "filled: nothing was answered; use a shorter --window or a lower --fps")


def watch_many(reasoner, sources: list[tuple[str, list[str]]], window: float, every: float, fps: float = 2.0,
               **options) -> Iterator[dict]:
    """Several sources on one model: ``watch`` of each ``(source, questions)`` on a thread of its own, their lines
    merged as they come. Their requests share the Reasoner's engine: up to its ``max_batch`` run at once, their
    decode steps batched; past that they wait for a place first in, first out, and a source's ticks that come while
    its answers run or wait are skipped, counted per source. ``max_windows`` applies to each source. A source that fails
    (gives up, ends before its window fills, cannot be read) is reported as a ``"source_failed"`` line and the
    others go on; once every source has stopped, ``SourceError`` names the failures, if any. Stopping the
    iteration stops every source's capture (after the answer each is computing)."""
    import queue

    if not sources:
        raise InputError("give at least one source")
    for src, questions in sources:  # every source and question checked before any capture starts
        source_kind(src)
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise InputError(f"source {src} has no question")
    if len(sources) == 1:
        yield from watch(reasoner, sources[0][0], sources[0][1], window, every, fps, **options)
        return
    size = max(1, round(checks.check_number("window", window, lo=0, lo_open=True, hi=3600) *
                        checks.check_number("fps", fps, lo=0, lo_open=True, hi=60)))
    checked = set()
    for _, questions in sources:
        if tuple(questions) not in checked:
            check_requests(reasoner, questions, fps, size, options.get("method", "base"),
                           options.get("max_new_tokens", WATCH_MAX_NEW_TOKENS),
                           options.get("template", WATCH_TEMPLATE),
                           {k: v for k, v in options.items() if k not in WATCH_OPTIONS})
            checked.add(tuple(questions))
    lines: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    failures: list[str] = []

    def run(src: str, questions: list[str]) -> None:
        gen = watch(reasoner, src, questions, window, every, fps, **options)
        try:
            for line in gen:
                lines.put(line)
                if stop.is_set():
                    break
        except UserError as e:
            failures.append(f"{src}: {e}")
            lines.put({"event": "source_failed", "source": src, "timestamp": wall_clock(), "message": str(e)})
        except Exception as e:  # noqa: BLE001 (one source's failure ends that source, reported as a line)
            failures.append(f"{src}: {type(e).__name__}: {e}")
            lines.put({"event": "source_failed", "source": src, "timestamp": wall_clock(),
                       "message": f"{type(e).__name__}: {e}"})
        finally:
            gen.close()
            lines.put(None)

    threads = [threading.Thread(target=run, args=(src, list(qs)), name=f"watch {src}", daemon=True)
               for src, qs in sources]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                running -= 1
            else:
                yield line
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    if failures:
        raise SourceError(f"{len(failures)} of {len(sources)} sources failed; first: {failures[0]}")


# watch's own keyword options (the rest go to each request)
WATCH_OPTIONS = ("method", "trigger", "max_windows", "realtime", "reconnect", "max_new_tokens", "template")
