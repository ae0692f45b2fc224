"""Reading a chat request: its messages (the question and the visual input, from a ``data:`` URL, a path under
``--media-root`` or a remote URL), its options, and the OpenAI-style error a bad one is answered with."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from models.errors import UserError

MEDIA_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                "image/bmp": ".bmp", "video/mp4": ".mp4", "video/x-msvideo": ".avi", "video/quicktime": ".mov",
                "video/webm": ".webm", "video/x-matroska": ".mkv"}
SAMPLING_FIELDS = ("temperature", "top_p", "seed")
# OpenAI fields this server does not implement, each with the values that ask for nothing (the field may then be sent
# and is ignored); any other value would be ignored silently, so it is refused: an answer without the tool call, the
# log-probabilities, the JSON format or the penalty asked for would look like one that had them
UNSUPPORTED_FIELDS = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}
CONTROLLER_FIELDS = ("vreason_beta", "vreason_every", "vreason_steps", "vreason_lr", "lite_ratio")


class ApiError(Exception):
    """An error answered as OpenAI's error body with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def media_path(url: str, media_root: Path | None, param: str = "messages", folders: bool = False) -> Path:
    """A path or ``file://`` URL, confined to ``media_root`` (links followed, then checked); a file, or
    (``folders``) a folder of frames too."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if media_root is None:
        raise ApiError(403, f"media path {url!r} refused: the server has no --media-root (send a data: URL)",
                       "permission_error", param)
    root = media_root.resolve()
    target = (root / url).resolve() if not os.path.isabs(url) else Path(url).resolve()
    if target == root or root not in target.parents:
        raise ApiError(403, f"media path {url!r} is outside --media-root {root} (after following links); refused",
                       "permission_error", param)
    if not (target.is_file() or (folders and target.is_dir())):
        raise ApiError(400, f"media file {url!r} does not exist under --media-root", param=param)
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


def check_public_host(host: str, port: int, allowed: set[str], what: str = "media", param: str = "messages") -> None:
    """Refuse (403) a ``host`` that resolves to a loopback, link-local, private or otherwise not public address,
    unless the host or that address is listed in ``allowed``; 400 when it does not resolve. ``what`` names the host
    in the message (``media``, ``stream``)."""
    import ipaddress
    import socket

    if host in allowed:
        return
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ApiError(400, f"{what} host {host!r} does not resolve ({e.strerror or e})", param=param) from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if str(addr) in allowed:
            continue
        if not addr.is_global or addr.is_multicast:
            raise ApiError(403, f"{what} host {host} resolves to {addr}, a loopback, link-local or private address; "
                                "refused unless listed with --allow-media-host", "permission_error", param)


def _remote(url: str, tmp: Path, allowed: set[str], max_bytes: int) -> Path:
    """A remote image or video fetched to a file the request owns: public addresses only (unless listed), no
    redirects, at most ``max_bytes``."""
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    if not parts.hostname:
        raise ApiError(400, f"media URL {url!r} has no host", param="messages")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    check_public_host(parts.hostname, port, allowed)
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
                   max_bytes: int = 64 << 20, live=None) -> tuple[str, dict]:
    """(question, visual keywords for ``Reasoner.ask``) of a chat request's messages. ``remote``: None, remote URLs
    refused; else the hosts and addresses that may be fetched although not public. ``live(id)``: (frames, fps) of
    the latest window of a live stream, for a ``stream://ID`` URL."""
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
            if url.startswith("stream://"):
                if live is None:
                    raise ApiError(400, "this server has no live streams", param="messages")
                frames, fps = live(url[len("stream://"):])
                visual = {"frames": frames, "fps": fps}
                continue
            if url.startswith(("http://", "https://")):
                if remote is None:
                    raise ApiError(403, "remote media URLs are not fetched without --allow-remote-media; send a "
                                        "data: URL or a path under --media-root", "permission_error", "messages")
                path = _remote(url, tmp, remote, max_bytes)
            elif url.startswith("data:"):
                path = _data_url(url, tmp)
            else:
                path = media_path(url, media_root)
            visual = {"image" if kind == "image_url" else "video": str(path)}
        else:
            raise ApiError(400, f"unsupported content part {kind!r}: text, image_url or video_url", param="messages")
    question = "\n".join(texts).strip()
    if not question:
        raise ApiError(400, "the message has no text: ask a question", param="messages")
    return question, visual


def request_options(body: dict) -> dict:
    """``Reasoner.stream`` keywords from the request's fields (OpenAI's, and this project's as extra fields)."""
    from runtime.sampling import SamplingParams

    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", param="n")
    for field, inert in UNSUPPORTED_FIELDS.items():
        if body.get(field) not in inert:
            raise ApiError(400, f"{field} is not supported here: this server answers one question about one image or "
                                f"video as text, without tools, log-probabilities, response formats or penalties; "
                                f"leave {field} out", param=field)
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


