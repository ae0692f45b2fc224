"""runtime.serve's live streams and alerts, on a real uvicorn server on 127.0.0.1 over the tiny export: a stream's
answers (over its event stream) equal the Python API's on the same window, alerts fire and are listed, ``stream://ID``
asks about a stream's latest window, and every bad source, trigger and id is refused with its status."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("regex")

from models.video import read_image  # noqa: E402
from runtime.reasoner import Reasoner  # noqa: E402
from runtime.serve import app  # noqa: E402
from tests.helpers import serving  # noqa: E402

KEY = "live-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of four identical frames: every window of it, looped, is the same clip."""
    import cv2

    root = tmp_path_factory.mktemp("live-media")
    frames = root / "still"
    frames.mkdir()
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 8:40] = (220, 40, 40)
    for i in range(4):
        cv2.imwrite(str(frames / f"{i:03d}.png"), img[:, :, ::-1])
    return root


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir, backend="ort", reuse_mb=64)


@pytest.fixture(scope="module")
def served(reasoner, media):
    """(url, the ASGI app) of the server."""
    asgi = app(reasoner=reasoner, api_key=KEY, media_root=media, max_streams=2)
    url, stop = serving(asgi)
    yield url, asgi
    stop()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def events(url: str, sid: str, until, limit_s: float = 60.0) -> list[dict]:
    """The stream's events until ``until(events)`` holds (or ``limit_s`` passes)."""
    got = []
    deadline = time.monotonic() + limit_s
    with httpx.stream("GET", f"{url}/v1/live-stream/{sid}/events", headers=AUTH, timeout=limit_s) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: "):]))
                if until(got):
                    break
            assert time.monotonic() < deadline, f"no such event in {limit_s} s: {[e['event'] for e in got][-20:]}"
    return got


def test_a_stream_answers_alerts_fire_and_it_can_be_asked_about(server, reasoner, media):
    still = [read_image(p) for p in sorted((media / "still").iterdir())]
    want = reasoner.ask(frames=still, fps=2.0, question=QUESTION, max_new_tokens=6, template="plain")
    c = httpx.Client(base_url=server, headers=AUTH, timeout=60)
    r = c.post("/v1/live-stream", json={"url": "still", "name": "still", "questions": [QUESTION], "fps": 2,
                                        "window": 2, "every": 1, "loop": True, "max_tokens": 6})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert [s["id"] for s in c.get("/v1/live-stream").json()["data"]] == [sid]

    got = events(server, sid, lambda ev: sum(e["event"] == "answer" for e in ev) >= 2)
    answers = [e for e in got if e["event"] == "answer"]
    for a in answers:  # the keys of runtime.watch's lines, and the stream's own
        assert {"timestamp", "source", "window_start_s", "window_end_s", "question", "answer", "text", "ttft_s",
                "total_s", "reused_prompt_tokens", "skipped_ticks", "dropped_frames", "reconnects", "alert",
                "entropy_mean", "stream_id", "entropy"} <= set(a)
        assert a["stream_id"] == sid and a["question"] == QUESTION
        assert a["text"] == want.text and a["answer"] == want.answer  # the same window as the Python API's
        assert a["entropy"] == pytest.approx(want.entropy, abs=1e-5)
    tokens = "".join(e["text"] for e in got if e["event"] == "token" and e["question"] == QUESTION)
    assert want.text in tokens  # the answers streamed in token by token first
    assert answers[-1]["reused_prompt_tokens"] > 0  # the same window again: its prefix came from the reuse store

    # an alert on a question of its own: it joins the stream's questions, and fires on every matching answer
    other = "Is there a red square?"
    r = c.post("/v1/alerts", json={"stream_id": sid, "question": other, "trigger": ".*"})
    assert r.status_code == 201, r.text
    aid = r.json()["id"]
    got = events(server, sid, lambda ev: any(e["event"] == "alert" for e in ev))
    alert = next(e for e in got if e["event"] == "alert")
    assert alert["alert_id"] == aid and alert["question"] == other and alert["stream_id"] == sid
    answered = [e for e in got if e["event"] == "answer" and e["question"] == other]
    assert answered and answered[-1]["alert"] is True
    recent = c.get("/v1/alerts/recent", params={"stream_id": sid}).json()["data"]
    assert recent and recent[0]["alert_id"] == aid
    listed = c.get("/v1/alerts").json()["data"]
    assert [a["id"] for a in listed] == [aid] and listed[0]["fired"] >= 1 and listed[0]["active"] is True
    # an alert whose trigger does not match stays quiet
    r = c.post("/v1/alerts", json={"stream_id": sid, "question": QUESTION, "trigger": "^never matches$"})
    quiet = r.json()["id"]
    events(server, sid, lambda ev: sum(e["event"] == "answer" and e["question"] == QUESTION for e in ev) >= 2)
    assert c.get("/v1/alerts").json()["data"][1]["fired"] == 0
    assert c.delete(f"/v1/alerts/{quiet}").status_code == 200
    assert c.delete(f"/v1/alerts/{quiet}").status_code == 404

    # stream://ID: a chat request about the stream's latest window, answered like the Python API
    chat = c.post("/v1/chat/completions", json={"max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"stream://{sid}"}}, {"type": "text", "text": QUESTION}]}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == want.text
    frame = c.get(f"/v1/live-stream/{sid}/frame")
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert frame.content[:2] == b"\xff\xd8"

    metrics = c.get("/metrics").text
    assert f'vreason_stream_answers_total{{stream="{sid}"}}' in metrics and "vreason_alerts_fired_total" in metrics
    hits = next(line for line in metrics.splitlines() if line.startswith("vreason_reuse_hits_total"))
    assert float(hits.split()[-1]) > 0  # the repeated window's prefix came from the reuse store
    for name in ("vreason_stream_skipped_ticks_total", "vreason_stream_dropped_frames_total",
                 "vreason_stream_reconnects_total", "vreason_kv_cache_bytes", "vreason_batch_size",
                 "vreason_live_answers_total", "vreason_reuse_hits_total"):
        assert name in metrics

    # deleting the stream ends its event stream and takes its alerts with it
    assert c.delete(f"/v1/live-stream/{sid}").status_code == 200
    assert c.get("/v1/live-stream").json()["data"] == [] and c.get("/v1/alerts").json()["data"] == []
    assert c.get(f"/v1/live-stream/{sid}/events").status_code == 404


def test_bad_sources_triggers_and_ids_are_refused(server, media, tmp_path):
    c = httpx.Client(base_url=server, headers=AUTH, timeout=60)
    outside = tmp_path / "outside"
    outside.mkdir()
    (media / "escape").symlink_to(outside, target_is_directory=True)

    def refused(path: str, body, status: int, words: str, method: str = "POST") -> None:
        r = c.request(method, path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert words in err["message"] and "\n" not in err["message"] and "Traceback" not in r.text

    refused("/v1/live-stream", {"url": "../outside"}, 403, "outside --media-root")
    refused("/v1/live-stream", {"url": "escape"}, 403, "outside --media-root")  # a link out of the root
    refused("/v1/live-stream", {"url": str(outside)}, 403, "outside --media-root")
    refused("/v1/live-stream", {"url": "file:///etc"}, 403, "outside --media-root")
    refused("/v1/live-stream", {"url": "rtsp://127.0.0.1/cam"}, 403, "--allow-remote-media")
    refused("/v1/live-stream", {"url": "ftp://example.com/cam"}, 400, "scheme")
    refused("/v1/live-stream", {"url": "concat:/etc/passwd|x"}, 400, "does not exist")  # a name under the root
    refused("/v1/live-stream", {"url": "0"}, 403, "--allow-camera")
    refused("/v1/live-stream", {"url": "nothing-here"}, 400, "does not exist")
    refused("/v1/live-stream", {"url": "still", "fps": 0}, 400, "fps")
    refused("/v1/live-stream", {"url": "still", "questions": [""]}, 400, "questions")
    refused("/v1/live-stream", {"url": "still", "method": "magic"}, 400, "unknown method")
    refused("/v1/live-stream", {"url": "still", "questions": ["why? " * 5000]}, 400, "prompt")
    # a field it does not know (the Python API's name for max_tokens here) is refused, not left to its default
    refused("/v1/live-stream", {"url": "still", "questions": ["q"], "max_new_tokens": 8}, 400,
            "unknown field 'max_new_tokens'")
    refused("/v1/alerts", {"stream_id": "stream-nope", "question": "q", "trigger": "x", "cooldown": 5}, 400,
            "unknown field 'cooldown'")
    refused("/v1/alerts", {"stream_id": "stream-nope", "question": "q", "trigger": "x"}, 404, "no live stream")
    refused("/v1/live-stream/stream-nope", None, 404, "no live stream", "DELETE")
    refused("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "stream://stream-nope"}}, {"type": "text", "text": "q"}]}]},
        404, "no live stream")
    assert c.get("/v1/live-stream", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/v1/alerts/recent").status_code == 401

    sid = c.post("/v1/live-stream", json={"url": "still", "questions": ["q"], "loop": True}).json()["id"]
    try:
        refused("/v1/alerts", {"stream_id": sid, "question": "q", "trigger": "(unclosed"}, 400, "regular expression")
        refused("/v1/alerts", {"stream_id": sid, "question": "", "trigger": "x"}, 400, "question")
        refused("/v1/alerts/recent?limit=0", None, 400, "limit", "GET")
        second = c.post("/v1/live-stream", json={"url": "still", "loop": True}).json()["id"]
        refused("/v1/live-stream", {"url": "still"}, 429, "--max-streams")  # the server keeps two
        c.delete(f"/v1/live-stream/{second}")
        # a catastrophic trigger is cut off by its time limit: the stream goes on answering
        hostile = c.post("/v1/alerts", json={"stream_id": sid, "question": "q", "trigger": "(a|aa)+$"})
        assert hostile.status_code == 201
        got = events(server, sid, lambda ev: sum(e["event"] == "answer" for e in ev) >= 2)
        assert all(e["event"] in ("answer", "token", "alert") for e in got)
    finally:
        c.delete(f"/v1/live-stream/{sid}")


def test_a_subscriber_that_goes_away_is_dropped(served):
    server, asgi = served
    c = httpx.Client(base_url=server, headers=AUTH, timeout=60)
    sid = c.post("/v1/live-stream", json={"url": "still", "questions": ["q"], "loop": True, "every": 0.5}).json()["id"]
    try:
        events(server, sid, lambda ev: any(e["event"] == "token" for e in ev))  # reads one token, then disconnects
        stream = asgi.state.service.streams.get(sid)
        deadline = time.monotonic() + 10
        while stream._subscribers and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not stream._subscribers
    finally:
        c.delete(f"/v1/live-stream/{sid}")
