"""Live streams and alerts in the service: ``LiveStream`` captures a source (``runtime.live.Capture``) and asks its
standing questions, and the questions of its alerts, on the latest window at every tick, through the Reasoner's
engine like any chat request; ``Streams`` holds them, their alerts and the recent alert firings.

Every answer is published to the stream's subscribers (``GET /v1/live-stream/{id}/events``) as the line
``runtime.watch`` writes, plus ``stream_id``, ``name`` and the answer's ``entropy`` trace; while an answer is being
generated, a ``token`` event per token (its text piece and entropy); the source's health events (reconnecting,
reconnected, gave_up); an ``alert`` event when an alert's trigger matches an answer to its question; ``error``
when a question is refused on a window; ``ended`` when the stream stops.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from models import checks
from models.errors import UserError
from runtime.live import Capture, Window, answer_line, check_requests, source_kind, ticks, wall_clock
from runtime.serve.requests import ApiError, check_public_host, media_path

SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")  # what a stream URL may be
TRIGGER_TIMEOUT_S = 0.05  # a trigger regex gets this long per answer (regex's own timeout: no catastrophic patterns)
SUBSCRIBER_QUEUE = 1024  # events a slow subscriber may fall behind by; older ones are dropped for it
RECENT = 256  # alert firings kept for GET /v1/alerts/recent


@dataclass
class Alert:
    id: str
    stream_id: str
    question: str
    trigger: str
    pattern: object = field(repr=False)
    created: str = field(default_factory=wall_clock)
    active: bool = False  # the latest answer to its question matched
    fired: int = 0
    last_fired: str | None = None

    def describe(self) -> dict:
        return {"id": self.id, "stream_id": self.stream_id, "question": self.question, "trigger": self.trigger,
                "created": self.created, "active": self.active, "fired": self.fired, "last_fired": self.last_fired}

    def matches(self, answer: str) -> bool:
        try:
            return bool(self.pattern.search(answer, timeout=TRIGGER_TIMEOUT_S))
        except TimeoutError:
            return False


def compile_trigger(trigger) -> object:
    import regex

    if not isinstance(trigger, str) or not trigger or len(trigger) > 500:
        raise ApiError(400, "trigger must be a regular expression of 1 to 500 characters", param="trigger")
    try:
        return regex.compile(trigger, regex.IGNORECASE)
    except regex.error as e:
        raise ApiError(400, f"trigger {trigger!r} is not a regular expression: {e}", param="trigger") from None


class LiveStream:
    """One source, captured on its own thread, its questions asked at every tick on a worker thread."""

    def __init__(self, streams: Streams, sid: str, source: str, name: str, fps: float, window: float, every: float,
                 questions: list[str], method: str, max_new_tokens: int, template: str, loop: bool,
                 reconnect: int) -> None:
        self.streams, self.id, self.source, self.name = streams, sid, source, name
        self.fps, self.window, self.every = fps, window, every
        self.questions, self.method, self.max_new_tokens, self.template = questions, method, max_new_tokens, template
        self.created = wall_clock()
        self.size = max(1, round(window * fps))
        self.cap = Capture(source, fps, self.size, realtime=True, reconnect=reconnect, loop=loop)
        self.state = "starting"  # running once the first window is answered; at the end: ended, failed or stopped
        self.error: str | None = None
        self.answers = 0
        self.skipped = 0
        self.latest: dict[str, dict] = {}  # question -> its latest answer line
        self._lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._stopping = threading.Event()
        self._active = None  # the Stream being answered
        self._thread = threading.Thread(target=self._run, name=f"live {sid}", daemon=True)

    def start(self) -> LiveStream:
        self.cap.start()
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop asking (the answer being computed is cancelled after its current token) and stop the capture."""
        self._stopping.set()
        active = self._active
        if active is not None:
            active.cancel()
        self.cap.stop(wait=wait)
        if wait:
            self._thread.join(timeout=30)

    def questions_now(self) -> list[str]:
        """The standing questions, then its alerts' questions not among them."""
        qs = list(self.questions)
        for a in self.streams.alerts_of(self.id):
            if a.question not in qs:
                qs.append(a.question)
        return qs

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "source": self.source, "fps": self.fps, "window": self.window,
                "every": self.every, "questions": self.questions, "method": self.method,
                "max_tokens": self.max_new_tokens, "loop": self.cap.loop, "created": self.created,
                "state": self.state, "error": self.error, "answers": self.answers, "skipped_ticks": self.skipped,
                "dropped_frames": self.cap.dropped, "reconnects": self.cap.reconnects, "frames": self.cap.samples,
                "alerts": [a.id for a in self.streams.alerts_of(self.id)]}

    # -- frames, for the page and for stream://ID in a chat request ------------------------------------------

    def latest_window(self) -> tuple[list, float]:
        with self.cap.cond:
            frames = [f.rgb for f in self.cap.ring]
        if len(frames) < self.size:
            raise ApiError(409, f"live stream {self.id} has {len(frames)} of the {self.size} frames of its first "
                                "window; ask again once it has filled", param="messages", code="stream_not_ready")
        return frames, self.fps

    def latest_jpeg(self) -> bytes | None:
        import cv2

        with self.cap.cond:
            frame = self.cap.ring[-1].rgb if self.cap.ring else None
        if frame is None:
            return None
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
        return buf.tobytes() if ok else None

    # -- subscribers ---------------------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        """A queue of this stream's events from now on, for a coroutine on the running event loop; the latest
        answer to each question is put in it first. ``None`` in it: the stream ended."""
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            for line in self.latest.values():
                q.put_nowait(line)
            if self.state in ("ended", "failed", "stopped"):
                q.put_nowait(None)
            else:
                self._subscribers.append((asyncio.get_running_loop(), q))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [(lo, s) for lo, s in self._subscribers if s is not q]

    def publish(self, event: dict | None) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            if event is None:
                self._subscribers.clear()
        for lo, q in subscribers:
            try:
                lo.call_soon_threadsafe(_offer, q, event)
            except RuntimeError:  # that event loop has closed
                pass

    # -- the worker ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        r = self.streams.reasoner
        try:
            for item in ticks(self.cap, self.every):
                if self._stopping.is_set():
                    break
                if isinstance(item, dict):  # reconnecting, reconnected, gave_up
                    self.publish({**item, "stream_id": self.id, "name": self.name})
                    continue
                self.skipped = item.skipped
                for q in self.questions_now():
                    if self._stopping.is_set():
                        break
                    self._answer(r, item, q)
                if self.state == "starting":
                    self.state = "running"
            if self.cap.error and not self._stopping.is_set():
                self.state, self.error = "failed", self.cap.error
            elif self.state != "failed":
                self.state = "stopped" if self._stopping.is_set() else "ended"
        except Exception as e:  # noqa: BLE001 (a stream's failure ends that stream, reported in its state)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.cap.stop()
            self.publish({"event": "ended", "stream_id": self.id, "name": self.name, "timestamp": wall_clock(),
                          "state": self.state, "error": self.error})
            self.publish(None)

    def _answer(self, r, window: Window, question: str) -> None:
        t0 = time.perf_counter()
        try:
            stream = r.stream(frames=[f.rgb for f in window.frames], fps=self.fps, question=question,
                              method=self.method, max_new_tokens=self.max_new_tokens, template=self.template,
                              events=True)
            self._active = stream
            if self._stopping.is_set():
                stream.cancel()
            for ev in stream:
                self.publish({"event": "token", "stream_id": self.id, "question": question, "text": ev.text,
                              "entropy": ev.entropy})
        except UserError as e:
            self.publish({"event": "error", "stream_id": self.id, "name": self.name, "timestamp": wall_clock(),
                          "question": question, "message": str(e).splitlines()[0]})
            return
        finally:
            self._active = None
        if stream.cancelled:
            return
        res = stream.result
        alerts = [a for a in self.streams.alerts_of(self.id) if a.question == question]
        fired = [a for a in alerts if a.matches(res.answer)]
        line = answer_line(self.source, window, question, res, time.perf_counter() - t0, self.cap, bool(fired))
        line.update(stream_id=self.id, name=self.name, entropy=res.entropy)
        with self._lock:
            self.latest[question] = line
        self.answers += 1
        self.streams.answered(res)
        self.publish(line)
        for a in alerts:
            a.active = a in fired
        for a in fired:
            a.fired += 1
            a.last_fired = line["timestamp"]
            event = {"event": "alert", "alert_id": a.id, "stream_id": self.id, "name": self.name,
                     "timestamp": line["timestamp"], "question": question, "trigger": a.trigger,
                     "answer": res.answer, "window_start_s": line["window_start_s"],
                     "window_end_s": line["window_end_s"]}
            self.streams.fired(event)
            self.publish(event)


def _offer(q: asyncio.Queue, event) -> None:
    """Put an event in a subscriber's queue; a subscriber that fell ``SUBSCRIBER_QUEUE`` events behind loses its
    oldest (the end of the stream is never lost)."""
    while True:
        try:
            q.put_nowait(event)
            return
        except asyncio.QueueFull:
            q.get_nowait()


STREAM_FIELDS = ("url", "source", "name", "questions", "fps", "window", "every", "max_tokens", "reconnect", "method",
                 "template", "loop")  # POST /v1/live-stream
ALERT_FIELDS = ("stream_id", "question", "trigger")  # POST /v1/alerts


def known_fields(body, fields: tuple[str, ...]) -> None:
    """Refuse (400, naming it) a field this API does not know: ignored, a misspelt or misnamed setting
    (``max_new_tokens`` for ``max_tokens``) would leave the stream running on its default without a word. ``body``:
    a JSON object (``Service.read_json``)."""
    unknown = [k for k in body if k not in fields]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; the fields are {', '.join(fields)}", param=unknown[0])


class Streams:
    """The service's live streams and alerts."""

    def __init__(self, reasoner, media_root, remote: set[str] | None, allow_camera: bool = False,
                 max_streams: int = 8, max_alerts: int = 64, on_answer=None) -> None:
        self.reasoner, self.media_root, self.remote = reasoner, media_root, remote
        self.allow_camera, self.max_streams, self.max_alerts = allow_camera, max_streams, max_alerts
        self.streams: dict[str, LiveStream] = {}
        self.alerts: dict[str, Alert] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.fired_total = 0
        self._on_answer = on_answer
        self._lock = threading.Lock()

    def answered(self, result) -> None:
        if self._on_answer is not None:
            self._on_answer(result)

    def fired(self, event: dict) -> None:
        with self._lock:
            self.recent.append(event)
            self.fired_total += 1

    def get(self, sid: str) -> LiveStream:
        s = self.streams.get(sid)
        if s is None:
            raise ApiError(404, f"no live stream {sid!r}; GET /v1/live-stream lists them", code="stream_not_found")
        return s

    def alerts_of(self, sid: str) -> list[Alert]:
        return [a for a in list(self.alerts.values()) if a.stream_id == sid]

    def source(self, given) -> str:
        """The source a request names, under the service's rules: a path under ``--media-root``; an rtsp, rtmp or
        http(s) URL only with ``--allow-remote-media`` (its host public or listed); a camera index only with
        ``--allow-camera``."""
        if not isinstance(given, str) or not given.strip():
            raise ApiError(400, "url must name the source: a path under --media-root or a stream URL", param="url")
        given = given.strip()
        if given.isdigit():
            if not self.allow_camera:
                raise ApiError(403, "camera sources are refused unless the server runs with --allow-camera",
                               "permission_error", "url")
            return given
        if "://" in given and not given.startswith("file://"):
            if not given.lower().startswith(SCHEMES):
                raise ApiError(400, f"stream URL scheme not taken: use {', '.join(SCHEMES)} or a path", param="url")
            if self.remote is None:
                raise ApiError(403, "stream URLs are not opened without --allow-remote-media", "permission_error",
                               "url")
            from urllib.parse import urlsplit

            parts = urlsplit(given)
            if not parts.hostname:
                raise ApiError(400, f"stream URL {given!r} has no host", param="url")
            default = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "https": 443}.get(parts.scheme.lower(), 80)
            check_public_host(parts.hostname, parts.port or default, self.remote, "stream", "url")
            return given
        path = media_path(given, self.media_root, param="url", folders=True)
        try:
            source_kind(str(path))
        except UserError as e:
            raise ApiError(400, str(e), param="url") from None
        return str(path)

    def add(self, body: dict) -> LiveStream:
        """Check a POST /v1/live-stream body and start the stream (``check_requests`` runs the prompt checks)."""
        from runtime.live import WATCH_MAX_NEW_TOKENS, WATCH_TEMPLATE

        known_fields(body, STREAM_FIELDS)
        source = self.source(body.get("url", body.get("source")))
        name = body.get("name") or source.rsplit("/", 1)[-1]
        if not isinstance(name, str) or len(name) > 200:
            raise ApiError(400, "name must be a string of at most 200 characters", param="name")
        questions = body.get("questions", [])
        questions = [questions] if isinstance(questions, str) else questions
        if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions) \
                or len(questions) > 16:
            raise ApiError(400, "questions must be a list of at most 16 non-empty strings", param="questions")
        try:
            fps = checks.check_number("fps", body.get("fps", 2.0), lo=0, lo_open=True, hi=30)
            window = checks.check_number("window", body.get("window", 4.0), lo=0, lo_open=True, hi=600)
            every = checks.check_number("every", body.get("every", 2.0), lo=0.1, hi=3600)
            limit = checks.check_number("max_tokens", body.get("max_tokens", WATCH_MAX_NEW_TOKENS), lo=1, hi=4096,
                                        integer=True)
            reconnect = checks.check_number("reconnect", body.get("reconnect", 5), lo=0, hi=100, integer=True)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        method, template = body.get("method", "base"), body.get("template", WATCH_TEMPLATE)
        size = max(1, round(window * fps))
        try:
            check_requests(self.reasoner, [q.strip() for q in questions] or ["?"], fps, size, method, limit,
                           template, {})
        except UserError as e:
            raise ApiError(400, str(e).splitlines()[0]) from None
        with self._lock:
            if len(self.streams) >= self.max_streams:
                raise ApiError(429, f"{len(self.streams)} live streams run, the most --max-streams allows; delete one "
                                    "first", "rate_limit_error", code="too_many_streams")
            sid = f"stream-{uuid.uuid4().hex[:12]}"
            s = LiveStream(self, sid, source, name, fps, window, every, [q.strip() for q in questions], method,
                           limit, template, bool(body.get("loop", False)), reconnect)
            self.streams[sid] = s
        return s.start()

    def remove(self, sid: str) -> None:
        s = self.get(sid)
        with self._lock:
            self.streams.pop(sid, None)
            for aid in [a.id for a in self.alerts.values() if a.stream_id == sid]:
                del self.alerts[aid]
        s.stop()

    def add_alert(self, body: dict) -> Alert:
        known_fields(body, ALERT_FIELDS)
        s = self.get(body.get("stream_id") if isinstance(body.get("stream_id"), str) else "")
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "question must be a non-empty string", param="question")
        pattern = compile_trigger(body.get("trigger"))
        try:
            check_requests(self.reasoner, [question.strip()], s.fps, s.size, s.method, s.max_new_tokens, s.template,
                           {})
        except UserError as e:
            raise ApiError(400, str(e).splitlines()[0]) from None
        with self._lock:
            if len(self.alerts) >= self.max_alerts:
                raise ApiError(429, f"{len(self.alerts)} alerts are set, the most this server keeps; delete one first",
                               "rate_limit_error", code="too_many_alerts")
            a = Alert(f"alert-{uuid.uuid4().hex[:12]}", s.id, question.strip(), body["trigger"], pattern)
            self.alerts[a.id] = a
        return a

    def remove_alert(self, aid: str) -> None:
        with self._lock:
            if self.alerts.pop(aid, None) is None:
                raise ApiError(404, f"no alert {aid!r}; GET /v1/alerts lists them", code="alert_not_found")

    def recent_alerts(self, sid: str | None = None, limit: int = 50) -> list[dict]:
        with self._lock:
            events = [e for e in self.recent if sid is None or e["stream_id"] == sid]
        return events[-limit:][::-1]  # newest first

    def close(self, wait: bool = True) -> None:
        """Stop every stream (the server is shutting down)."""
        for s in list(self.streams.values()):
            s.stop(wait=False)
        if wait:
            for s in list(self.streams.values()):
                s.stop()
