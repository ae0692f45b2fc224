"""python -m runtime.serve: a real uvicorn server on 127.0.0.1 over the tiny export, driven by the official
``openai`` client and by plain HTTP. Answers equal the Python API's; bad input gets OpenAI-style errors."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from models.samples import sample_video  # noqa: E402
from runtime.reasoner import Reasoner  # noqa: E402
from runtime.serve import app  # noqa: E402
from tests.helpers import serving  # noqa: E402

KEY = "test-key"
QUESTION = "Which way does the circle move?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    sample_video(root / "clip.mp4", "circle", "red", "right", seconds=2, fps=8)
    outside = tmp_path_factory.mktemp("outside")
    sample_video(outside / "secret.mp4", seconds=1, fps=8)
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    return root, outside


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir, backend="ort", reuse_mb=0)


@pytest.fixture(scope="module")
def server(reasoner, media):
    url, stop = serving(app(reasoner=reasoner, api_key=KEY, media_root=media[0], max_body_mb=1))
    yield url
    stop()


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def video_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def test_chat_with_a_video_equals_the_python_api(server, reasoner, media):
    want = reasoner.ask(video=str(media[0] / "clip.mp4"), question=QUESTION, max_new_tokens=8, template="plain")
    c = client(server)
    assert [m.id for m in c.models.list().data] == [reasoner.engine_dir.name]
    got = c.chat.completions.create(model=reasoner.engine_dir.name, messages=video_message("clip.mp4"), max_tokens=8)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens == len(want.prompt_token_ids)
    ext = got.model_extra["vreason"]
    assert ext["entropy"] == pytest.approx(want.entropy, abs=1e-5) and "ttft_s" in ext["timings"]
    # streamed: the chunks' text is the same answer, the last chunk carries usage and the extension
    pieces, tokens, last = [], [], None
    for chunk in c.chat.completions.create(model=reasoner.engine_dir.name, messages=video_message("clip.mp4"),
                                           max_tokens=8, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        token = (chunk.model_extra or {}).get("vreason", {})
        if "token_id" in token:
            tokens.append((token["token_id"], token["entropy"]))
        last = chunk
    assert "".join(pieces) == want.text and last.choices[0].finish_reason in ("stop", "length")
    ids = [t for t, _ in tokens][: len(want.token_ids)]  # (a held-back character's piece repeats the last id)
    assert ids == want.token_ids and [h for _, h in tokens][: len(ids)] == pytest.approx(want.entropy, abs=1e-5)
    # the same clip as a data: URL, and V-Reason through the extra fields
    data = base64.b64encode((media[0] / "clip.mp4").read_bytes()).decode()
    steered = c.chat.completions.create(model=reasoner.engine_dir.name,
                                        messages=video_message(f"data:video/mp4;base64,{data}"), max_tokens=8,
                                        extra_body={"method": "vreason", "vreason_lr": 0.5, "vreason_every": 1})
    solo = reasoner.ask(video=str(media[0] / "clip.mp4"), question=QUESTION, max_new_tokens=8, template="plain",
                        method="vreason", controller={"lr": 0.5, "every": 1})
    assert steered.choices[0].message.content == solo.text and steered.model_extra["vreason"]["method"] == "vreason"


def _post(url: str, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers=headers, timeout=60)


@pytest.mark.parametrize("case, status, words", [
    ("no key", 401, "API key"),
    ("bad json", 400, "not JSON"),
    ("no messages", 400, "messages"),
    ("unknown model", 404, "not served here"),
    ("outside", 403, "outside --media-root"),
    ("link out", 403, "outside --media-root"),
    ("remote", 403, "remote media"),
    ("too big", 413, "--max-body-mb"),
    ("bad video", 400, "video"),
    ("bad data url image", 400, "the request's media (its data: or http(s) URL)"),
    ("bad tokens", 400, "max_tokens"),
    ("tools", 400, "tools is not supported"),
    ("logprobs", 400, "logprobs is not supported"),
    ("json format", 400, "response_format is not supported"),
    ("penalty", 400, "frequency_penalty is not supported"),
])
def test_bad_requests_get_openai_style_errors(server, media, tmp_path, case, status, words):
    body = {"messages": video_message("clip.mp4"), "max_tokens": 4}
    key, raw = KEY, None
    if case == "no key":
        key = None
    elif case == "bad json":
        raw = b"{not json"
    elif case == "no messages":
        body = {"messages": []}
    elif case == "unknown model":
        body["model"] = "gpt-4o"
    elif case == "outside":
        body["messages"] = video_message(str(media[1] / "secret.mp4"))
    elif case == "link out":
        body["messages"] = video_message("link.mp4")
    elif case == "remote":
        body["messages"] = video_message("https://example.com/a.mp4")
    elif case == "too big":
        body["pad"] = "x" * (2 << 20)
    elif case == "bad video":
        (media[0] / "broken.mp4").write_bytes(b"not a video")
        body["messages"] = video_message("broken.mp4")
    elif case == "bad tokens":
        body["max_tokens"] = -1
    elif case == "bad data url image":  # named as the client sent it, not as the server's temporary copy
        body["messages"] = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "?"}]}]
    elif case == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "open_gate", "parameters": {"type": "object"}}}]
    elif case == "logprobs":
        body["logprobs"] = True
    elif case == "json format":
        body["response_format"] = {"type": "json_object"}
    elif case == "penalty":
        body["frequency_penalty"] = 0.5
    r = _post(server, body, key, raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "Traceback" not in r.text and "\n" not in err["message"]
    assert "vreason-serve-" not in err["message"]  # no path of the server's own


def test_openai_fields_that_ask_for_nothing_are_accepted(server):
    """The OpenAI fields the server does not implement are refused only where they ask for something (above); sent
    at values that ask for nothing, as clients do, they are accepted."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "logprobs": False, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "user": "gate-7"}
    r = _post(server, body, KEY)
    assert r.status_code == 200, r.text


def test_health_needs_no_key_and_the_rest_does(server):
    assert httpx.get(f"{server}/health/live", timeout=10).json()["status"] == "live"
    assert httpx.get(f"{server}/health/ready", timeout=10).json()["status"] == "ready"
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()


def test_a_client_that_disconnects_mid_stream_cancels_its_request(server, reasoner, monkeypatch):
    """The stream is closed after two chunks: the request stops in the engine long before its 200 tokens."""
    seen = []
    original = reasoner.stream

    def recording(**kw):
        s = original(**kw)
        seen.append(s)
        return s

    monkeypatch.setattr(reasoner, "stream", recording)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert any(x.startswith("data: ") for x in got)
    deadline = time.monotonic() + 30
    while (not seen or seen[0].result is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[0].cancelled and len(seen[0].result.token_ids) < 200  # cancelled only by the disconnect


def test_metrics_count_what_was_answered(server):
    before = _metric(server, "vreason_requests_total", 'outcome="ok"')
    c = client(server)
    c.chat.completions.create(model="fp32", messages=[{"role": "user", "content": QUESTION}], max_tokens=3)
    assert _metric(server, "vreason_requests_total", 'outcome="ok"') == before + 1
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for name in ("vreason_generated_tokens_total", "vreason_ttft_seconds_bucket", "vreason_token_seconds_count",
                 "vreason_queue_depth", "vreason_requests_in_flight", "vreason_reuse_store_bytes"):
        assert name in text
    assert httpx.get(f"{server}/metrics", timeout=10).status_code == 401


def _metric(url: str, name: str, label: str = "") -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.split()[-1])
    return 0.0


def test_more_waiting_requests_than_max_queue_get_429(reasoner, monkeypatch):
    """--max-queue 0: while one request is being answered (held here until released), the next gets 429 with
    Retry-After; once it is done, requests are served again."""
    release, entered = threading.Event(), threading.Event()
    real = reasoner.stream

    def held(**kw):
        entered.set()
        release.wait(30)
        return real(**kw)

    url, stop = serving(app(reasoner=reasoner, max_queue=0))
    try:
        monkeypatch.setattr(reasoner, "stream", held)
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))
        first.start()
        assert entered.wait(30)
        busy = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert "--max-queue 0" in busy.json()["error"]["message"]
        release.set()
        first.join(60)
        monkeypatch.setattr(reasoner, "stream", real)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        release.set()
        stop()


def _server_process(engine_dir, *extra: str):
    """``python -m runtime.serve`` in a subprocess on a free port, once it is ready: (process, url)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--engine", str(engine_dir), "--port", str(port),
                             "--no-verify", "--backend", "ort", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return proc, url


def _sigterm_during_a_streamed_answer(proc, url: str, max_tokens: int) -> tuple[str, list[str]]:
    """A streamed answer of ``max_tokens``, SIGTERM sent after its first line: (first line, the other lines)."""
    import signal

    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        proc.send_signal(signal.SIGTERM)
        return first, [line for line in lines if line]


def test_sigterm_stops_accepting_finishes_the_running_request_and_exits_0(engine_dir):
    """python -m runtime.serve as users run it: SIGTERM during a streamed answer lets that answer finish (uvicorn's
    graceful shutdown, 10 s at most), then the process exits 0."""
    proc, url = _server_process(engine_dir)
    try:
        first, rest = _sigterm_during_a_streamed_answer(proc, url, 64)
        assert first.startswith("data: ") and "data: [DONE]" in rest  # the running answer finished
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out and '"status": 200' in out  # the answer finished and was logged
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_cuts_an_answer_longer_than_the_grace_period_short_with_an_error(engine_dir):
    """SIGTERM during a streamed answer that would outlast the grace period (``--grace-s 3``, 8000 tokens asked of the
    tiny model): 2 s before the grace period ends the answer is cut short (``Service.stop_answers``) and its stream
    ends with a 503 error event that says so, where uvicorn would cut the connection and log the cancelled request's
    traceback; the process exits 0 within the grace period and a little."""
    proc, url = _server_process(engine_dir, "--grace-s", "3")
    try:
        t0 = time.monotonic()
        first, rest = _sigterm_during_a_streamed_answer(proc, url, 8000)
        assert first.startswith("data: ") and "data: [DONE]" not in rest
        error = json.loads(rest[-1].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and "cut short after" in error["message"]
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 3 + 10
        out = proc.stdout.read()
        assert "Traceback" not in out and '"status": 503' in out and "graceful shutdown exceeded" not in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_remote_media_only_with_the_flag_and_private_addresses_only_when_listed(reasoner, media):
    """A clip served over HTTP on 127.0.0.1: refused without --allow-remote-media (403), refused with it while
    127.0.0.1 is not listed (a loopback address, 403), fetched once listed (the answer equals the path's); a
    redirect is not followed."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/moved.mp4":
                self.send_response(302)
                self.send_header("Location", "/clip.mp4")
                self.end_headers()
                return
            super().do_GET()

    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(media[0])))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    clip = f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"
    want = reasoner.ask(video=str(media[0] / "clip.mp4"), question=QUESTION, max_new_tokens=4, template="plain")
    body = {"messages": video_message(clip), "max_tokens": 4}
    refused, stop_refused = serving(app(reasoner=reasoner, allow_remote_media=True))
    listed, stop_listed = serving(app(reasoner=reasoner, allow_remote_media=True, media_hosts=["127.0.0.1"]))
    try:
        r = _post(refused, body, key=None)
        assert r.status_code == 403 and "resolves to 127.0.0.1" in r.json()["error"]["message"]
        r = _post(listed, body, key=None)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want.text
        r = _post(listed, {**body, "messages": video_message(clip.replace("clip.mp4", "moved.mp4"))}, key=None)
        assert r.status_code == 400 and "redirects are not followed" in r.json()["error"]["message"]
    finally:
        stop_refused()
        stop_listed()
        files.shutdown()
