"""A soak test of ``python -m runtime.serve`` (a subprocess, over the tiny export, on 127.0.0.1): 32 clients, each
making its 4 requests (streamed and not, some disconnecting midway) again and again, plus 2 live streams with 2
alerts each, for ``VREASON_SOAK_S`` seconds (default 180). No 5xx; no deadlock (every client finishes, the server
still answers); every finished answer equals the same request through the Python API; the server's resident
memory over the last third (its median, sampled every half second) within +5% of what it was over the middle
third; SIGTERM then exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from runtime.reasoner import Reasoner  # noqa: E402

SOAK_S = float(os.environ.get("VREASON_SOAK_S", "180"))
CLIENTS, PER_CLIENT = 32, 4
QUESTIONS = ["Which way does the circle move?", "What color is the circle?", "How many objects are there?",
             "Describe the clip."]
TOKENS = (6, 10, 8, 12)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def body(i: int, stream: bool) -> dict:
    return {"max_tokens": TOKENS[i], "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": QUESTIONS[i]}]}]}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_soak(engine_dir, tmp_path):
    from models.samples import sample_video

    root = tmp_path / "media"
    root.mkdir()
    sample_video(root / "clip.mp4", "circle", "red", "right", seconds=2, fps=8)
    sample_video(root / "cam.mp4", "square", "blue", "left", seconds=2, fps=8)
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0)
    want = [r.ask(video=str(root / "clip.mp4"), question=q, max_new_tokens=n, template="plain").text
            for q, n in zip(QUESTIONS, TOKENS)]
    del r

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--engine", str(engine_dir), "--port", str(port),
                               "--media-root", str(root), "--backend", "ort", "--reuse-mb", "32", "--max-queue", "256",
                               "--no-verify"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)

        c = httpx.Client(base_url=url, timeout=120)
        streams, alerts = [], []
        for src in ("clip.mp4", "cam.mp4"):
            got = c.post("/v1/live-stream", json={"url": src, "loop": True, "window": 1, "every": 1,
                                                   "questions": ["What moves?"], "max_tokens": 8})
            assert got.status_code == 201, got.text
            streams.append(got.json()["id"])
            for q, trigger in (("Is there a circle?", ".*"), ("Is it raining?", "^never$")):
                a = c.post("/v1/alerts", json={"stream_id": streams[-1], "question": q, "trigger": trigger})
                assert a.status_code == 201, a.text
                alerts.append((a.json()["id"], trigger))

        statuses: Counter = Counter()
        wrong: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + SOAK_S

        def note(status, problem=None):
            with lock:
                statuses[status] += 1
                if problem:
                    wrong.append(problem)

        def client(k: int) -> None:
            http = httpx.Client(base_url=url, timeout=120)
            try:
                while time.monotonic() < stop_at:
                    for j in range(PER_CLIENT):
                        i = (k + j) % len(QUESTIONS)
                        mode = (k + j) % 4  # 0 plain, 1 streamed, 2 streamed and dropped after 2 chunks, 3 plain
                        if mode in (0, 3):
                            got = http.post("/v1/chat/completions", json=body(i, False))
                            text = got.json()["choices"][0]["message"]["content"] if got.status_code == 200 else None
                            note(got.status_code, None if text in (None, want[i]) else f"{QUESTIONS[i]}: {text!r}")
                            continue
                        with http.stream("POST", "/v1/chat/completions", json=body(i, True)) as got:
                            if got.status_code != 200:
                                got.read()
                                note(got.status_code)
                                continue
                            pieces, done, chunks = [], False, 0
                            for line in got.iter_lines():
                                if not line.startswith("data: "):
                                    continue
                                if line == "data: [DONE]":
                                    done = True
                                    break
                                chunk = json.loads(line[6:])
                                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                                chunks += 1
                                if mode == 2 and chunks == 2:
                                    break  # the client goes away mid-answer
                            text = "".join(pieces)
                            note(200 if done or mode == 2 else "unfinished",
                                 None if not done or text == want[i] else f"{QUESTIONS[i]} (streamed): {text!r}")
            except Exception as e:  # noqa: BLE001 (any client failure fails the test, below)
                with lock:
                    errors.append(f"client {k}: {type(e).__name__}: {e}")
            finally:
                http.close()

        seen: dict[str, Counter] = {sid: Counter() for sid in streams}

        def subscriber(sid: str) -> None:  # one reader of each stream's events, for the whole soak
            try:
                with httpx.stream("GET", f"{url}/v1/live-stream/{sid}/events", timeout=60) as got:
                    for line in got.iter_lines():
                        if line.startswith("data: "):
                            seen[sid][json.loads(line[6:])["event"]] += 1
                        if time.monotonic() > stop_at:
                            return
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"events of {sid}: {type(e).__name__}: {e}")

        samples: list[tuple[float, int]] = []  # (seconds into the soak, the server's resident memory)

        def sampler() -> None:  # single readings move by about 3% as the server's worker threads come and go
            start = time.monotonic()
            while time.monotonic() < stop_at:
                samples.append((time.monotonic() - start, rss(server.pid)))
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        threads += [threading.Thread(target=subscriber, args=(sid,), daemon=True) for sid in streams]
        threads.append(threading.Thread(target=sampler, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SOAK_S + 120)
        assert not any(t.is_alive() for t in threads), "a client is still waiting: deadlock?"
        first = statistics.median(m for t, m in samples if SOAK_S / 3 <= t < 2 * SOAK_S / 3)  # the middle third
        last = statistics.median(m for t, m in samples if t >= 2 * SOAK_S / 3)  # the last third

        assert not errors, errors[:5]
        assert not wrong, wrong[:5]
        assert not [s for s in statuses if not isinstance(s, int) or s >= 500], statuses
        assert set(statuses) == {200}, statuses
        assert statuses[200] >= CLIENTS * PER_CLIENT, statuses
        described = {s["id"]: s for s in c.get("/v1/live-stream").json()["data"]}
        for sid in streams:
            assert described[sid]["state"] == "running" and described[sid]["answers"] > 0, described[sid]
        fired = {a["id"]: a["fired"] for a in c.get("/v1/alerts").json()["data"]}
        for aid, trigger in alerts:
            assert (fired[aid] > 0) == (trigger == ".*"), (trigger, fired[aid])
        for sid in streams:  # its subscriber saw answers (streamed in token by token) and alerts
            assert seen[sid]["answer"] > 0 and seen[sid]["token"] > 0 and seen[sid]["alert"] > 0, seen[sid]
        assert c.post("/v1/chat/completions", json=body(0, False)).json()["choices"][0]["message"]["content"] == want[0]
        assert last <= 1.05 * first, (f"resident memory grew from {first / 2**20:.0f} MiB (median over the middle "
                                      f"third) to {last / 2**20:.0f} MiB (over the last third)")
        print(f"soak {SOAK_S:g} s: {statuses[200]} answers, rss {first / 2**20:.0f} -> {last / 2**20:.0f} MiB, "
              f"live answers {[described[s]['answers'] for s in streams]}, alerts fired {fired}, events seen {seen}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
