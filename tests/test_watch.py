"""python -m runtime.watch and Reasoner.watch: windows of a file, a folder and an MJPEG stream over HTTP (which
drops the connection once), reconnects, skipped ticks, one-line failures."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from models.samples import render_frames, sample_video
from runtime.reasoner import Reasoner
from runtime.watch import main as watch_main

Q1, Q2 = "Is the shape moving?", "What color is it?"


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir, backend="ort", reuse_mb=64)


class MJPEG:
    """An MJPEG stream on 127.0.0.1 at ``rate`` frames/s: the first connection is cut after ``cut`` frames, the
    next ones serve ``total`` frames each; after ``connections`` connections the server stops."""

    def __init__(self, rate=20.0, cut=30, total=80, connections=2):
        jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in render_frames("square", "blue", "left", frames=24)]
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.connections += 1
                n = cut if outer.connections == 1 else total
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(n):
                        j = jpegs[i % len(jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(j)
                                         + j + b"\r\n")
                        time.sleep(1 / rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if outer.connections >= connections:  # stop listening: a later connect is refused
                    threading.Thread(target=outer.close, daemon=True).start()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc):
        self.close()


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_watch_a_file_offline(engine_dir, tmp_path, capsys):
    video = sample_video(tmp_path / "v.mp4", "circle", "red", "right", seconds=6, fps=8)
    out = tmp_path / "w.jsonl"
    args = ["--engine", str(engine_dir), "--source", str(video), "--question", Q1, "--question", Q2, "--window", "2",
            "--every", "1", "--fps", "2", "--max-new-tokens", "4", "--as-fast-as-possible", "--no-verify"]
    assert watch_main([*args, "--jsonl", str(out)]) == 0
    got = lines(capsys.readouterr().out)
    assert got == lines(out.read_text())
    assert not any(x["alert"] for x in got)  # no trigger, no alert
    # a trigger: the first answer, in the other case, anchored (case-insensitive search of each answer)
    first = got[0]["answer"]
    trigger = f"^{re.escape(first.swapcase())}$"
    assert watch_main([*args, "--trigger", trigger]) == 0
    alerts = lines(capsys.readouterr().out)
    assert [x["answer"] for x in alerts] == [x["answer"] for x in got]
    assert [x["alert"] for x in alerts] == [x["answer"].lower() == first.lower() for x in got]
    assert alerts[0]["alert"]
    stamps = [datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")) for x in got]
    assert stamps == sorted(stamps) and all(abs(time.time() - t.timestamp()) < 600 for t in stamps)
    # windows of 4 samples (0.5 s apart), a tick every second of stream time, both questions each tick
    assert [(x["window_start_s"], x["window_end_s"]) for x in got[::2]] == [(0.0, 1.5), (1.0, 2.5), (2.0, 3.5),
                                                                           (3.0, 4.5), (4.0, 5.5)]
    assert [x["question"] for x in got] == [Q1, Q2] * 5
    assert all(x["skipped_ticks"] == 0 and x["dropped_frames"] == 0 for x in got)
    assert all(x["reused_prompt_tokens"] > 0 for x in got[1::2])  # the second question reuses the clip's prefix
    assert set(got[0]) == {"event", "timestamp", "source", "window_start_s", "window_end_s", "question", "answer",
                           "text", "ttft_s", "total_s", "reused_prompt_tokens", "skipped_ticks", "dropped_frames",
                           "reconnects", "alert", "entropy_mean"}


def test_watch_skips_ticks_while_busy(reasoner, tmp_path):
    """A folder played in real time while each answer takes longer than a tick: ticks are skipped and counted,
    nothing queues, and frames no window held are counted as dropped."""
    for i, f in enumerate(render_frames("square", "blue", "left", frames=40)):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), f)
    slow = SlowReasoner(reasoner, 1.2)
    got = list(Reasoner.watch(slow, tmp_path, [Q1], window=1.0, every=0.5, fps=4.0, max_windows=3,
                              max_new_tokens=2))
    assert len(got) == 3
    assert got[0]["skipped_ticks"] == 0 and got[-1]["skipped_ticks"] >= 2
    assert got[-1]["dropped_frames"] > 0
    ends = [x["window_end_s"] for x in got]
    assert ends == sorted(ends) and ends[1] - ends[0] >= 1.0  # the latest window, not the next queued one


class SlowReasoner:
    """A Reasoner whose answers take at least ``seconds``."""

    def __init__(self, inner, seconds):
        self.inner, self.seconds = inner, seconds

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def ask(self, **kw):
        t = time.monotonic()
        res = self.inner.ask(**kw)
        time.sleep(max(0.0, self.seconds - (time.monotonic() - t)))
        return res


def test_watch_an_mjpeg_stream_reconnects(engine_dir, capsys):
    with MJPEG(rate=20, cut=30, total=100) as cam:
        code = watch_main(["--engine", str(engine_dir), "--source", cam.url, "--question", Q1, "--window", "1",
                           "--every", "0.5", "--fps", "4", "--max-new-tokens", "2", "--max-windows", "4",
                           "--no-verify"])
        assert code == 0
        assert cam.connections == 2  # the cut connection was reopened
    out, err = capsys.readouterr()
    events = lines(out)
    got = [x for x in events if x["event"] == "answer"]
    health = [x["event"] for x in events if x["event"] != "answer"]
    assert health[:2] == ["reconnecting", "reconnected"]  # the cut, reported where it happened
    assert "1 reconnected, no give-up" in err  # (the second connection may end too before the watch stops)
    assert len(got) == 4 and all(x["source"] == cam.url for x in got)
    assert all(0.6 <= x["window_end_s"] - x["window_start_s"] <= 1.5 for x in got)
    assert got[-1]["window_end_s"] > 1.5  # past the cut: read from the second connection
    assert got[-1]["dropped_frames"] > 0  # the samples the reconnect missed


def test_watch_gives_up_on_a_dead_stream(engine_dir, capsys):
    with MJPEG(rate=20, cut=10, connections=1) as cam:
        code = watch_main(["--engine", str(engine_dir), "--source", cam.url, "--question", Q1, "--window", "2",
                           "--reconnect", "1", "--no-verify"])
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert f"source {cam.url} stopped and 1 reopening in a row failed: gave up (--reconnect 1)" in err[0]
    assert [x["event"] for x in lines(out)] == ["reconnecting", "gave_up"]


def test_watch_checks_every_argument_before_capture_and_says_when_no_window_filled(engine_dir, tmp_path, capsys):
    video = sample_video(tmp_path / "short.mp4", seconds=1, fps=8)
    base = ["--engine", str(engine_dir), "--source", str(video), "--question", Q1, "--no-verify"]
    assert watch_main([*base, "--window", "4", "--as-fast-as-possible"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "before a 4 s window at 2 fps (8 frames) filled" in err[0]
    started = []
    import runtime.live as live

    class NoCapture(live.Capture):
        def start(self):
            started.append(self)
            return super().start()

    for bad, why in ((["--max-new-tokens", "-1"], "max_new_tokens"),
                     (["--question", "why " * 5000], "prompt limit")):
        live.Capture, original = NoCapture, live.Capture
        try:
            assert watch_main([*base, "--window", "1", *bad]) == 1
        finally:
            live.Capture = original
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]
    assert not started  # refused before the source was opened


def test_reasoner_watch_and_the_command_share_their_defaults():
    import inspect

    from runtime.live import watch
    from runtime.watch import parser

    defaults = parser().parse_args(["--engine", "e", "--source", "s", "--question", "q"])
    params = inspect.signature(watch).parameters
    assert params["max_new_tokens"].default == defaults.max_new_tokens == 64
    assert params["template"].default == defaults.template == "plain"


def test_watch_refuses_bad_sources_in_one_line(engine_dir, tmp_path, capsys):
    assert watch_main(["--engine", str(engine_dir), "--source", str(tmp_path / "missing.mp4"), "--question", Q1]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a video file, a folder of frames, a camera index or a URL" in err[0]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    assert watch_main(["--engine", str(engine_dir), "--source", str(bad), "--question", Q1, "--no-verify"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert watch_main(["--engine", str(engine_dir), "--source", str(bad), "--question", Q1, "--trigger", "(",
                       "--no-verify"]) == 1
    assert "--trigger" in capsys.readouterr().err


def test_frames_of_a_window_are_rgb(tmp_path):
    """The capture converts OpenCV's BGR: a pure red file frame reaches the model red."""
    from runtime.live import Capture

    frames = [np.zeros((64, 64, 3), np.uint8) for _ in range(8)]
    for f in frames:
        f[:, :, 2] = 255  # BGR red
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"{i}.png"), f)
    cap = Capture(str(tmp_path), fps=2.0, size=2, realtime=False).start()
    try:
        assert cap.wait_for(0.5)
        (a, b) = cap.window()
        assert a.rgb[0, 0].tolist() == [255, 0, 0] and (a.t, b.t) == (0.0, 0.5)
    finally:
        cap.stop()


def test_several_sources_on_one_model(engine_dir, tmp_path, capsys):
    """Two sources on one Reasoner, a question for both and one for each: every line names its source, each
    source's answers are the ones it gets watched alone, and a third source that never fills its window is
    reported as a line of its own while the others go on; the run then exits 1 naming it."""
    left = sample_video(tmp_path / "left.mp4", "square", "blue", "left", seconds=3, fps=8)
    right = sample_video(tmp_path / "right.mp4", "circle", "red", "right", seconds=3, fps=8)
    short = sample_video(tmp_path / "short.mp4", seconds=1, fps=8)
    common = ["--engine", str(engine_dir), "--window", "2", "--every", "1", "--fps", "2", "--max-new-tokens", "4",
              "--as-fast-as-possible", "--no-verify"]
    alone = {}
    for src, asked in ((left, [Q1]), (right, [Q1, Q2])):
        assert watch_main([*common, "--source", str(src), *(a for q in asked for a in ("--question", q))]) == 0
        alone[str(src)] = [(x["window_end_s"], x["question"], x["answer"], x["text"])
                           for x in lines(capsys.readouterr().out)]
    assert watch_main([*common, "--question", Q1, "--source", str(left), "--source", str(right), "--question",
                       Q2]) == 0
    out, err = capsys.readouterr()
    got = lines(out)
    assert {x["source"] for x in got} == {str(left), str(right)}
    for src in (left, right):
        mine = [(x["window_end_s"], x["question"], x["answer"], x["text"]) for x in got if x["source"] == str(src)]
        assert mine == alone[str(src)]  # left asked Q1 (the common question), right Q1 and its own Q2
    assert "over 2 sources" in err
    code = watch_main([*common, "--question", Q1, "--source", str(left), "--source", str(short)])
    out, err = capsys.readouterr()
    events = lines(out)
    failed = [x for x in events if x["event"] == "source_failed"]
    assert code == 1 and len(failed) == 1 and failed[0]["source"] == str(short)
    assert [x["answer"] for x in events if x["event"] == "answer"] == [a[2] for a in alone[str(left)]]
    assert "1 of 2 sources failed" in err.strip().splitlines()[-1]


def test_a_source_without_a_question_is_refused(engine_dir, tmp_path, capsys):
    video = sample_video(tmp_path / "v.mp4", seconds=2, fps=8)
    assert watch_main(["--engine", str(engine_dir), "--source", str(video), "--question", Q1, "--source",
                       str(video), "--no-verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no --question" in err[0]


def test_reasoner_watch_takes_a_list_of_sources(reasoner, tmp_path):
    a = sample_video(tmp_path / "a.mp4", seconds=2, fps=8)
    b = sample_video(tmp_path / "b.mp4", "circle", "red", "right", seconds=2, fps=8)
    got = list(reasoner.watch([str(a), (str(b), [Q2])], Q1, window=1.0, every=1.0, max_windows=1, realtime=False,
                              max_new_tokens=2))
    assert sorted((x["source"], x["question"]) for x in got) == [(str(a), Q1), (str(b), Q2)]


def test_sigterm_stops_the_command_as_ctrl_c_does_and_exits_0(engine_dir, tmp_path):
    """``python -m runtime.watch`` under a service manager: SIGTERM after the first answer stops it as Ctrl-C does
    (the summary line written, the lines so far complete) and it exits 0; before, the process died of the signal
    without its summary."""
    import signal
    import subprocess
    import sys

    video = sample_video(tmp_path / "long.mp4", "circle", "red", "right", seconds=30, fps=8)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.watch", "--engine", str(engine_dir), "--source", str(video),
                             "--question", Q1, "--window", "1", "--every", "0.5", "--max-new-tokens", "4",
                             "--no-verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "answer"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert all(json.loads(x)["event"] for x in out.splitlines() if x.strip())  # every line whole
        assert "stopped; every finished line was written" in err and re.search(r"\d+ answers; ", err)
        assert "Traceback" not in err and "terminate called" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_reasoner_watch_refuses_an_unknown_keyword_before_capture(reasoner, tmp_path):
    """A keyword no answer takes (``max_tokens``, the HTTP API's name for ``max_new_tokens``) is refused as Python
    refuses one in any call, before the source is opened; before, it was found only at the first full window (here
    the clip is shorter than a window, so the run ended with the source's error instead)."""
    video = sample_video(tmp_path / "short.mp4", "circle", "red", "right", seconds=2, fps=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        list(reasoner.watch(str(video), [Q1], window=4.0, every=1.0, max_tokens=5))
