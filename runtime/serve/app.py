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

import base64
import binascii
import hmac
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from models.errors import InputError, UserError

MEDIA_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                "image/bmp": ".bmp", "video/mp4": ".mp4", "video/x-msvideo": ".avi", "video/quicktime": ".mov",
                "video/webm": ".webm", "video/x-matroska": ".mkv"}
SAMPLING_FIELDS = ("temperature", "top_p", "seed")
CONTROLLER_FIELDS = ("vreason_beta", "vreason_every", "vreason_steps", "vreason_lr", "lite_ratio")


class ApiError(Exception):
    """An error answered as OpenAI's error body with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _media_path(url: str, media_root: Path | None) -> Path:
    """A path or ``file://`` URL, confined to ``media_root`` (links followed, then checked)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if media_root is None:
        raise ApiError(403, f"media path {url!r} refused: the server has no --media-root (send a data: URL)",
                       "permission_error", "messages")
    root = media_root.resolve()
    target = (root / url).resolve() if not os.path.isabs(url) else Path(url).resolve()
    if target != root and root not in target.parents:
        raise ApiError(403, f"media path {url!r} is outside --media-root {root} (after following links); refused",
                       "permission_error", "messages")
    if not target.is_file():
        raise ApiError(400, f"media file {url!r} does not exist under --media-root", param="messages")
    return target


def _data_url(url: str, tmp: Path) -> Path:
    """A ``data:<mime>;base64,...`` URL written to a file the request owns."""
    head, _, payload = url.partition(",")
    mime = head[len("data:"):].split(";")[0].strip().lower()
    if ";base64" not in head or mime not in MEDIA_SUFFIX:
        raise ApiError(400, f"data URL of {mime or 'no'} type: send base64 of one of {', '.join(MEDIA_SUFFIX)}",
                       param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data URL's payload is not valid base64", param="messages") from None
    path = tmp / f"media{MEDIA_SUFFIX[mime]}"
    path.write_bytes(raw)
    return path


def _blocked_address(host: str, port: int, allowed: set[str]) -> str | None:
    """The first address ``host`` resolves to that is loopback, link-local, private or otherwise not public, unless
    the host or that address is listed in ``allowed``; None when every address may be fetched."""
    import ipaddress
    import socket

    if host in allowed:
        return None
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ApiError(400, f"media host {host!r} does not resolve ({e.strerror or e})", param="messages") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if str(addr) in allowed:
            continue
        if not addr.is_global or addr.is_multicast:
            return str(addr)
    return None


def _remote(url: str, tmp: Path, allowed: set[str], max_bytes: int) -> Path:
    """A remote image or video fetched to a file the request owns: public addresses only (unless listed), no
    redirects, at most ``max_bytes``."""
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    if not parts.hostname:
        raise ApiError(400, f"media URL {url!r} has no host", param="messages")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    blocked = _blocked_address(parts.hostname, port, allowed)
    if blocked is not None:
        raise ApiError(403, f"media host {parts.hostname} resolves to {blocked}, a loopback, link-local or private "
                            "address; refused unless listed with --allow-media-host", "permission_error", "messages")
    try:
        with httpx.stream("GET", url, follow_redirects=False, timeout=30) as r:
            if r.status_code != 200:
                raise ApiError(400, f"media URL answered HTTP {r.status_code} (redirects are not followed)",
                               param="messages")
            mime = r.headers.get("content-type", "").split(";")[0].strip().lower()
            suffix = MEDIA_SUFFIX.get(mime) or next((x for x in set(MEDIA_SUFFIX.values())
                                                     if parts.path.lower().endswith(x)), None)
            if suffix is None:
                raise ApiError(400, f"media URL of type {mime or 'unknown'}: an image or a video is needed",
                               param="messages")
            path, size = tmp / f"media{suffix}", 0
            with open(path, "wb") as f:
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ApiError(413, f"media at {url} is over --max-body-mb ({max_bytes / 2**20:g} MiB)")
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise ApiError(400, f"media URL could not be fetched ({type(e).__name__})", param="messages") from None
    return path


def parse_messages(messages, media_root: Path | None, tmp: Path, remote: set[str] | None = None,
                   max_bytes: int = 64 << 20) -> tuple[str, dict]:
    """(question, visual keyword for ``Reasoner.ask``) of a chat request's messages. ``remote``: None, remote URLs
    refused; else the hosts and addresses that may be fetched although not public."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ApiError(400, "one user message is supported (a question, with at most one image or video); system "
                            "prompts and earlier turns are not", param="messages")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(400, "message content must be a string or a list of parts", param="messages")
    texts, visual = [], {}
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{kind} part without a url", param="messages")
            if visual:
                raise ApiError(400, "at most one image or video per request", param="messages")
            if url.startswith(("http://", "https://")):
                if remote is None:
                    raise ApiError(403, "remote media URLs are not fetched without --allow-remote-media; send a "
                                        "data: URL or a path under --media-root", "permission_error", "messages")
                path = _remote(url, tmp, remote, max_bytes)
            elif url.startswith("data:"):
                path = _data_url(url, tmp)
            else:
                path = _media_path(url, media_root)
            visual = {"image" if kind == "image_url" else "video": str(path)}
        else:
            raise ApiError(400, f"unsupported content part {kind!r}: text, image_url or video_url", param="messages")
    question = "\n".join(texts).strip()
    if not question:
        raise ApiError(400, "the message has no text: ask a question", param="messages")
    return question, visual


def request_options(body: dict, reasoner) -> dict:
    """``Reasoner.stream`` keywords from the request's fields (OpenAI's, and this project's as extra fields)."""
    from runtime.sampling import SamplingParams

    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", param="n")
    limit = body.get("max_completion_tokens", body.get("max_tokens", 512))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        params = SamplingParams(**sampling)
        params.validate()
    except (TypeError, ValueError, UserError) as e:
        raise ApiError(400, f"sampling: {e}", param="temperature") from None
    method = body.get("method", "base")
    controller = {k.removeprefix("vreason_"): body[k] for k in CONTROLLER_FIELDS if body.get(k) is not None}
    return {"method": method, "max_new_tokens": limit, "sampling": params, "stop": stop,
            "template": body.get("template", "plain"), "controller": controller or None}


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

    def answered(self, result) -> None:
        t = result.timings
        self.tokens.inc(len(result.token_ids))
        self.prompt_tokens.inc(len(result.prompt_token_ids))
        self.reused.inc(t.get("reused_prompt_tokens", 0))
        self.queue.observe(t.get("queue_s", 0.0))
        if result.token_ids:
            self.ttft.observe(t["ttft_s"])
        if t.get("decode_tokens_per_s"):
            self.per_token.observe(1.0 / t["decode_tokens_per_s"])

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The routes over one Reasoner (see the module docstring)."""

    def __init__(self, reasoner, model_name: str, api_key: str | None = None, media_root: Path | None = None,
                 max_body_mb: float = 64.0, max_queue: int = 64, remote: set[str] | None = None) -> None:
        self.r, self.model, self.api_key = reasoner, model_name, api_key
        self.media_root = media_root
        self.remote = remote  # None: remote media refused; else the non-public hosts and addresses allowed
        self.max_body = int(max_body_mb * 2**20)
        self.max_queue = max_queue
        self.in_flight = 0  # chat requests admitted and not finished (answered in turn by the engine)
        self.created = int(time.time())
        self.metrics = Metrics(self)

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
        allow_remote_media: bool = False, media_hosts: list[str] | tuple = (), **load):
    """The ASGI app (any ASGI server can run it): over ``reasoner``, or the export at ``engine_dir`` loaded with
    ``Reasoner.load(engine_dir, **load)``. ``allow_remote_media``: fetch http(s) media URLs, from public
    addresses only, or from the hosts and addresses in ``media_hosts``."""
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if reasoner is None:
        from runtime.reasoner import Reasoner

        reasoner = Reasoner.load(engine_dir, **load)
    root = Path(media_root).expanduser() if media_root is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"--media-root {root} is not a folder")
    svc = Service(reasoner, Path(reasoner.engine_dir).name, api_key, root, max_body_mb, max_queue,
                  set(media_hosts) if allow_remote_media else None)

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
                                                       svc.remote, svc.max_body)
            options = request_options(body, reasoner)
            try:
                stream = await run_in_threadpool(lambda: reasoner.stream(question=question, events=True, **options,
                                                                         **visual))
            except UserError as e:
                raise ApiError(400, str(e).splitlines()[0]) from None
        except BaseException:
            _remove(tmp)
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.get("stream"):
            try:
                await run_in_threadpool(lambda: [None for _ in stream])
            except UserError as e:
                raise ApiError(400, str(e).splitlines()[0]) from None
            finally:
                _remove(tmp)
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
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": svc.model, "choices": [choice], **extra}) + "\n\n"
        pieces = iter(stream)
        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in iterate_in_threadpool(pieces):  # a chunk per token, with its entropy
                yield chunk({"content": event.text}, vreason={"token_id": event.id, "entropy": event.entropy})
            finished = True
            result = stream.result
            svc.metrics.requests.labels("ok").inc()
            svc.metrics.answered(result)
            log_request(request, 200, rid=rid, result=result, streamed=True)
            yield chunk({}, finish_reason(result, limit), usage=usage(result), vreason=extension(result))
            yield "data: [DONE]\n\n"
        except UserError as e:
            finished = True
            svc.metrics.requests.labels("client_error").inc()
            log_request(request, 400, rid=rid, error=str(e).splitlines()[0], streamed=True)
            yield "data: " + json.dumps(ApiError(400, str(e).splitlines()[0]).body()) + "\n\n"
        finally:
            svc.in_flight -= 1
            if not finished:  # the client went away: the request stops in the engine after its current token
                stream.cancel()
                svc.metrics.requests.labels("cancelled").inc()
                log_request(request, 499, rid=rid, error="client disconnected", streamed=True)
            try:
                pieces.close()
            except ValueError:  # a worker thread is inside it still; it ends once the engine has stopped
                pass
            _remove(tmp)

    routes = [Route("/health/live", guarded(live, keyed=False)), Route("/health/ready", guarded(ready, keyed=False)),
              Route("/metrics", guarded(metrics)), Route("/v1/models", guarded(models)),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"])]
    return Starlette(routes=routes)


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
