"""The HTTP service: an OpenAI-style chat endpoint with video over a loaded ``Reasoner``.

Routes: ``GET /health/live`` (the process answers), ``GET /health/ready`` (the export is loaded), ``GET /v1/models``,
``POST /v1/chat/completions`` (``stream: true``: Server-Sent Events, ``data: [DONE]`` last). The ASGI stack is
Starlette (with uvicorn in ``python -m runtime.serve``): small, no model layer of its own (the request's fields
are checked here, with the runtime's own one-line errors), and what FastAPI is built on.

A request is one user turn: its text parts are the question, and at most one ``image_url`` or ``video_url`` part
the visual input, given as a ``data:`` URL (base64), a path / ``file://`` URL under ``--media-root`` (a path
that leaves it, through ``..`` or a link, is refused with 403), or with ``--allow-remote-media`` an http(s) URL
(fetched from public addresses only: loopback, link-local and private ones are refused unless listed with
``--allow-media-host``; no redirects; at most ``--max-body-mb``). The answer runs on
the Reasoner's engine (``runtime.engine``); a client that disconnects mid-stream cancels its request.
"""

from __future__ import annotations

import hmac
import json
import tempfile
import time
import uuid
from pathlib import Path

from models.errors import InputError, UserError
from runtime.serve.requests import ApiError, parse_messages, request_options


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (``prometheus-client``)."""

    def __init__(self, service) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("vreason_requests", "Chat requests by outcome (ok, client_error, cancelled, "
                                "refused_busy, error)", ["outcome"], registry=self.registry)
        self.tokens = Counter("vreason_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("vreason_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.reused = Counter("vreason_reused_prompt_tokens", "Prompt tokens restored from the reuse store",
                              registry=self.registry)
        self.ttft = Histogram("vreason_ttft_seconds", "Time to the first token (queueing included)",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.per_token = Histogram("vreason_token_seconds", "Decode time per token",
                                   buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1), registry=self.registry)
        self.queue = Histogram("vreason_queue_seconds", "Time a request waited for the engine",
                               buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        depth = Gauge("vreason_queue_depth", "Requests queued for the engine, not started", registry=self.registry)
        depth.set_function(lambda: service.r.engine.waiting)
        active = Gauge("vreason_requests_in_flight", "Chat requests being answered or waiting",
                       registry=self.registry)
        active.set_function(lambda: service.in_flight)
        memory = Gauge("vreason_reuse_store_bytes", "Bytes held by the reuse store", registry=self.registry)
        memory.set_function(lambda: service.r.reuse.used)
        kv = Gauge("vreason_kv_cache_bytes", "Bytes of KV cache the running requests hold (within kv_mb)",
                   registry=self.registry)
        kv.set_function(lambda: service.r.kv_bytes)
        batch = Gauge("vreason_batch_size", "Requests running in the engine now (up to max_batch)",
                      registry=self.registry)
        batch.set_function(lambda: service.r.engine.running)
        self.live_answers = Counter("vreason_live_answers", "Answers to live streams' questions",
                                    registry=self.registry)
        self.reuse_hits = Counter("vreason_reuse_hits", "Answers that restored a prompt prefix or reused vision "
                                  "features from the reuse store", registry=self.registry)
        self.registry.register(StreamCollector(service.streams))

    def answered(self, result, live: bool = False) -> None:
        if live:
            self.live_answers.inc()
        t = result.timings
        self.tokens.inc(len(result.token_ids))
        self.prompt_tokens.inc(len(result.prompt_token_ids))
        self.reused.inc(t.get("reused_prompt_tokens", 0))
        if t.get("reused_prompt_tokens") or t.get("reused_vision_patches"):
            self.reuse_hits.inc()
        self.queue.observe(t.get("queue_s", 0.0))
        if result.token_ids:
            self.ttft.observe(t["ttft_s"])
        if t.get("decode_tokens_per_s"):
            self.per_token.observe(1.0 / t["decode_tokens_per_s"])

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class StreamCollector:
    """Per live stream figures, read at each scrape (streams come and go)."""

    def __init__(self, streams) -> None:
        self.streams = streams

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = {"skipped_ticks": ("Ticks skipped while the model was answering", "skipped"),
                   "dropped_frames": ("Sampled frames no answered window contained", "dropped"),
                   "reconnects": ("Times the source was reopened", "reconnects"),
                   "answers": ("Answers to the stream's questions", "answers")}
        families = {k: CounterMetricFamily(f"vreason_stream_{k}", help_, labels=["stream"])
                    for k, (help_, _) in figures.items()}
        for s in list(self.streams.streams.values()):
            values = {"skipped_ticks": s.skipped, "dropped_frames": s.cap.dropped, "reconnects": s.cap.reconnects,
                      "answers": s.answers}
            for k, fam in families.items():
                fam.add_metric([s.id], values[k])
        yield from families.values()
        yield GaugeMetricFamily("vreason_live_streams", "Live streams", value=len(self.streams.streams))
        yield GaugeMetricFamily("vreason_alerts", "Alerts set", value=len(self.streams.alerts))
        yield CounterMetricFamily("vreason_alerts_fired", "Alert firings (an answer matched a trigger)",
                                  value=self.streams.fired_total)


class Service:
    """The routes over one Reasoner (see the module docstring)."""

    def __init__(self, reasoner, model_name: str, api_key: str | None = None, media_root: Path | None = None,
                 max_body_mb: float = 64.0, max_queue: int = 64, remote: set[str] | None = None,
                 allow_camera: bool = False, max_streams: int = 8) -> None:
        from runtime.serve.streams import Streams

        self.r, self.model, self.api_key = reasoner, model_name, api_key
        self.media_root = media_root
        self.remote = remote  # None: remote media refused; else the non-public hosts and addresses allowed
        self.max_body = int(max_body_mb * 2**20)
        self.max_queue = max_queue
        self.in_flight = 0  # chat requests admitted and not finished (answered in turn by the engine)
        self.answering: set = set()  # the chat requests' streams being answered (``stop_answers``)
        self.stopping = False  # the server is shutting down and has cut the running answers short
        self.created = int(time.time())
        self.streams = Streams(reasoner, media_root, remote, allow_camera, max_streams,
                               on_answer=lambda result: self.metrics.answered(result, live=True))
        self.metrics = Metrics(self)

    def stop_answers(self) -> None:
        """The server's shutdown, near the end of its grace period: every chat answer still running is cancelled (the
        engine stops it after its current token) and ends with a 503 error (``cut_short``), rather than a connection
        cut when the grace period ends."""
        self.stopping = True
        for stream in list(self.answering):
            stream.cancel()

    def cut_short(self, stream, request, rid: str, streamed: bool) -> ApiError | None:
        """The 503 error of an answer that ``stop_answers`` cut short (counted and logged), else None."""
        if not (self.stopping and stream.cancelled):
            return None
        made = len(stream.result.token_ids) if stream.result is not None else 0
        message = f"the server is shutting down: this answer was cut short after {made} tokens; ask again"
        self.metrics.requests.labels("shutdown").inc()
        log_request(request, 503, rid=rid, error=message, streamed=streamed)
        return ApiError(503, message, "server_error", code="shutting_down")

    def admit(self) -> None:
        """Refuse (429) a request that would wait behind more than ``max_queue`` others."""
        if self.in_flight > self.max_queue:
            self.metrics.requests.labels("refused_busy").inc()
            raise ApiError(429, f"{self.in_flight} requests are waiting or running, over --max-queue "
                                f"{self.max_queue}; retry later", "rate_limit_error", code="queue_full")

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    async def read_json(self, request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise ApiError(413, f"request body of {int(size)} bytes is over --max-body-mb "
                                f"({self.max_body / 2**20:g} MiB)")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"request body is over --max-body-mb ({self.max_body / 2**20:g} MiB)")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "vreason-edge"}]}

    def completion(self, rid: str, result, limit: int) -> dict:
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish_reason(result, limit)}],
                "usage": usage(result), "vreason": extension(result)}


def client_words(error: Exception, tmp: Path) -> str:
    """A runtime error's first line as the client reads it: the server's own copy of the request's media (a data: or
    http(s) URL written under ``tmp``) named as what the client sent, not as a path on the server."""
    import re

    return re.sub(re.escape(str(tmp)) + r"/media\.\w+", "the request's media (its data: or http(s) URL)",
                  str(error).splitlines()[0])


def finish_reason(result, limit: int) -> str:
    return "length" if len(result.token_ids) >= limit else "stop"


def usage(result) -> dict:
    p, c = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def extension(result) -> dict:
    """What this runtime adds to a completion: the method, timings, reuse figures and the entropy trace."""
    return {"method": result.method, "backend": result.backend, "answer": result.answer, "timings": result.timings,
            "entropy": result.entropy, "ema": result.ema, "alpha": result.alpha}


def app(engine_dir: str | Path | None = None, *, reasoner=None, api_key: str | None = None,
        media_root: str | Path | None = None, max_body_mb: float = 64.0, max_queue: int = 64,
        allow_remote_media: bool = False, media_hosts: list[str] | tuple = (), allow_camera: bool = False,
        max_streams: int = 8, **load):
    """The ASGI app (any ASGI server can run it): over ``reasoner``, or the export at ``engine_dir`` loaded with
    ``Reasoner.load(engine_dir, **load)``. ``allow_remote_media``: fetch http(s) media URLs and open stream URLs,
    from public addresses only, or from the hosts and addresses in ``media_hosts``. ``allow_camera``: live streams
    may name a camera index. ``app.state.service`` is the ``Service``; ``service.streams.close()`` stops the live
    streams (done when the app shuts down)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if reasoner is None:
        from runtime.reasoner import Reasoner

        reasoner = Reasoner.load(engine_dir, **load)
    root = Path(media_root).expanduser() if media_root is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"--media-root {root} is not a folder")
    svc = Service(reasoner, Path(reasoner.engine_dir).name, api_key, root, max_body_mb, max_queue,
                  set(media_hosts) if allow_remote_media else None, allow_camera, max_streams)

    def guarded(handler, keyed: bool = True):
        async def endpoint(request):
            try:
                if keyed:
                    svc.check_key(request)
                return await handler(request)
            except ApiError as e:
                headers = {"Retry-After": "1"} if e.status == 429 else None
                if request.url.path == "/v1/chat/completions" and e.status != 429:
                    svc.metrics.requests.labels("client_error").inc()
                    log_request(request, e.status, error=str(e))
                return JSONResponse(e.body(), status_code=e.status, headers=headers)
        return endpoint

    async def live(request):
        return JSONResponse({"status": "live"})

    async def ready(request):
        return JSONResponse({"status": "ready", "model": svc.model, "backend": reasoner.backend.name})

    async def models(request):
        return JSONResponse(svc.models())

    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(svc.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def chat(request):
        svc.admit()
        svc.in_flight += 1
        try:
            return await answer(request)
        finally:
            svc.in_flight -= 1

    async def answer(request):
        body = await svc.read_json(request)
        if body.get("model") not in (None, svc.model):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                                f"{svc.model!r}", code="model_not_found", param="model")
        tmp = Path(tempfile.mkdtemp(prefix="vreason-serve-"))
        try:
            question, visual = await run_in_threadpool(parse_messages, body.get("messages"), svc.media_root, tmp,
                                                       svc.remote, svc.max_body,
                                                       lambda sid: svc.streams.get(sid).latest_window())
            options = request_options(body)
            try:
                stream = await run_in_threadpool(lambda: reasoner.stream(question=question, events=True, **options,
                                                                         **visual))
            except UserError as e:
                raise ApiError(400, client_words(e, tmp)) from None
        except BaseException:
            _remove(tmp)
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.get("stream"):
            svc.answering.add(stream)
            try:
                async for _ in stream:
                    pass
            except UserError as e:
                raise ApiError(400, client_words(e, tmp)) from None
            finally:
                svc.answering.discard(stream)
                _remove(tmp)
            cut = svc.cut_short(stream, request, rid, streamed=False)
            if cut is not None:
                raise cut
            svc.metrics.requests.labels("ok").inc()
            svc.metrics.answered(stream.result)
            log_request(request, 200, rid=rid, result=stream.result)
            return JSONResponse(svc.completion(rid, stream.result, options["max_new_tokens"]))
        svc.in_flight += 1  # until the stream ends (the handler returns before it does)
        return StreamingResponse(sse(rid, stream, tmp, options["max_new_tokens"], request),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def sse(rid: str, stream, tmp: Path, limit: int, request):
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse_event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.model,
                        "choices": [choice], **extra})
        finished = False
        svc.answering.add(stream)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in stream:  # a chunk per token, with its entropy, handed over by the engine's thread
                yield chunk({"content": event.text}, vreason={"token_id": event.id, "entropy": event.entropy})
            finished = True
            cut = svc.cut_short(stream, request, rid, streamed=True)
            if cut is not None:
                yield sse_event(cut.body())
                return
            result = stream.result
            svc.metrics.requests.labels("ok").inc()
            svc.metrics.answered(result)
            log_request(request, 200, rid=rid, result=result, streamed=True)
            yield chunk({}, finish_reason(result, limit), usage=usage(result), vreason=extension(result))
            yield "data: [DONE]\n\n"
        except UserError as e:
            finished = True
            svc.metrics.requests.labels("client_error").inc()
            words = client_words(e, tmp)
            log_request(request, 400, rid=rid, error=words, streamed=True)
            yield sse_event(ApiError(400, words).body())
        finally:
            svc.answering.discard(stream)
            svc.in_flight -= 1
            if not finished:  # the client went away: the request stops in the engine after its current token
                stream.cancel()
                svc.metrics.requests.labels("cancelled").inc()
                log_request(request, 499, rid=rid, error="client disconnected", streamed=True)
            _remove(tmp)

    # -- live streams and alerts (runtime.serve.streams) ----------------------------------------------------------

    async def add_stream(request):
        body = await svc.read_json(request)
        s = await run_in_threadpool(svc.streams.add, body)
        return JSONResponse(s.describe(), status_code=201)

    async def list_streams(request):
        return JSONResponse({"data": [s.describe() for s in list(svc.streams.streams.values())]})

    async def one_stream(request):
        return JSONResponse(svc.streams.get(request.path_params["sid"]).describe())

    async def delete_stream(request):
        await run_in_threadpool(svc.streams.remove, request.path_params["sid"])
        return JSONResponse({"deleted": request.path_params["sid"]})

    async def frame(request):
        s = svc.streams.get(request.path_params["sid"])
        jpeg = await run_in_threadpool(s.latest_jpeg)
        if jpeg is None:
            raise ApiError(409, f"live stream {s.id} has no frame yet", code="stream_not_ready")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def events(request):
        s = svc.streams.get(request.path_params["sid"])
        queue = s.subscribe()

        async def lines():
            import asyncio

            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # a comment line: proxies keep the connection, clients ignore it
                        continue
                    if event is None:
                        return
                    yield sse_event(event)
            finally:
                s.unsubscribe(queue)
        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def add_alert(request):
        body = await svc.read_json(request)
        a = await run_in_threadpool(svc.streams.add_alert, body)
        return JSONResponse(a.describe(), status_code=201)

    async def list_alerts(request):
        return JSONResponse({"data": [a.describe() for a in list(svc.streams.alerts.values())]})

    async def delete_alert(request):
        svc.streams.remove_alert(request.path_params["aid"])
        return JSONResponse({"deleted": request.path_params["aid"]})

    async def recent_alerts(request):
        sid = request.query_params.get("stream_id")
        limit = request.query_params.get("limit", "50")
        if not limit.isdigit() or not 1 <= int(limit) <= 256:
            raise ApiError(400, "limit must be an integer from 1 to 256", param="limit")
        return JSONResponse({"data": svc.streams.recent_alerts(sid, int(limit))})

    async def page(request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(svc.streams.close)

    routes = [Route("/", page), Route("/health/live", guarded(live, keyed=False)),
              Route("/health/ready", guarded(ready, keyed=False)),
              Route("/metrics", guarded(metrics)), Route("/v1/models", guarded(models)),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/live-stream", guarded(add_stream), methods=["POST"]),
              Route("/v1/live-stream", guarded(list_streams), methods=["GET"]),
              Route("/v1/live-stream/{sid}", guarded(one_stream), methods=["GET"]),
              Route("/v1/live-stream/{sid}", guarded(delete_stream), methods=["DELETE"]),
              Route("/v1/live-stream/{sid}/frame", guarded(frame)),
              Route("/v1/live-stream/{sid}/events", guarded(events)),
              Route("/v1/alerts", guarded(add_alert), methods=["POST"]),
              Route("/v1/alerts", guarded(list_alerts), methods=["GET"]),
              Route("/v1/alerts/recent", guarded(recent_alerts)),
              Route("/v1/alerts/{aid}", guarded(delete_alert), methods=["DELETE"])]
    asgi = Starlette(routes=routes, lifespan=lifespan)
    asgi.state.service = svc
    return asgi


KEEPALIVE_S = 15.0  # an event stream with nothing to say sends a comment line this often
PAGE = Path(__file__).with_name("page.html")


def sse_event(obj) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return "data: " + json.dumps(obj) + "\n\n"


def log_request(request, status: int, rid: str | None = None, result=None, error: str | None = None,
                streamed: bool = False) -> None:
    """One structured line (JSON) per chat request on the ``runtime.serve`` logger."""
    import logging

    line = {"event": "chat", "status": status, "id": rid, "client": request.client.host if request.client else None,
            "streamed": streamed}
    if result is not None:
        line.update(method=result.method, prompt_tokens=len(result.prompt_token_ids),
                    completion_tokens=len(result.token_ids), ttft_s=round(result.timings["ttft_s"], 4),
                    queue_s=round(result.timings.get("queue_s", 0.0), 4),
                    decode_tokens_per_s=round(result.timings["decode_tokens_per_s"], 2))
    if error is not None:
        line["error"] = error
    logging.getLogger("runtime.serve").log(logging.WARNING if status >= 400 else logging.INFO, json.dumps(line))


def _remove(tmp: Path) -> None:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
