"""Helpers shared by tests: prompts with visual inputs for our model and for transformers; a CLI's one-line error;
onnxruntime-genai's model of an export's own weights against ours; a call on a thread of its own."""

from __future__ import annotations

import threading

import numpy as np
import torch

from models.preprocess import VisionSettings, process_image, process_video
from models.qwen2_5_vl import VisualSpan


def visual_prompt(model, ckpt, kind: str, seed: int = 0):
    """(input_ids [S], [(span, pixel_values)], transformers kwargs) for a text / image / video prompt."""
    cfg = model.cfg
    s = VisionSettings.from_dir(ckpt)
    rng = np.random.default_rng(seed)
    ids = [1, 40, 41, 42]
    visuals, kw = [], {}
    if kind == "image":
        pv, g = process_image(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), s)
        visuals.append((VisualSpan("image", g), torch.from_numpy(pv)))
        kw = dict(pixel_values=torch.from_numpy(pv), image_grid_thw=torch.tensor([g]))
        pad = cfg.image_token_id
    elif kind == "video":
        frames = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(6)]
        pv, g = process_video(frames, s)
        visuals.append((VisualSpan("video", g, 1.0), torch.from_numpy(pv)))
        kw = dict(pixel_values_videos=torch.from_numpy(pv), video_grid_thw=torch.tensor([g]),
                  second_per_grid_ts=torch.tensor([1.0]))
        pad = cfg.video_token_id
    if visuals:
        g = visuals[0][0].grid_thw
        ids += [cfg.vision_start_token_id] + [pad] * (g[0] * g[1] * g[2] // 4) + [cfg.vision_end_token_id]
    ids += [50, 51, 52, 53, 54]
    return torch.tensor(ids), visuals, kw


def one_error_line(capsys, code: int, expected_code: int = 1) -> tuple[str, str]:
    """(the one stderr line, stdout) of a CLI call that failed with ``expected_code``, with no traceback."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0], out


def serving(asgi):
    """(url, stop) of a uvicorn server on a free loopback port."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started

    def stop():
        srv.should_exit = True
        thread.join(timeout=15)
    return f"http://127.0.0.1:{port}", stop


def peer_of_the_same_weights(engine, work) -> None:
    """onnxruntime-genai's model built from a float export's own weights (``runtime.bench.peer``) decodes the
    runtime's greedy tokens on a text prompt, from logits of the same entropy (the tiny models soon repeat one token;
    the entropies tell every weight apart: gate and up swapped in the conversion left the tokens and moved them by
    0.09)."""
    import pytest

    pytest.importorskip("onnxruntime_genai")
    from runtime.bench.peer import against, build, measure
    from runtime.reasoner import Reasoner

    r = Reasoner.load(engine, backend="ort", reuse_mb=0)
    text = r.manifest["config"]["text"]
    peer = measure(build(text, "fp32", work, engine), 8, 4, 1, text["vocab_size"])
    same = against(r, peer["greedy"], "Which shape moves left?", 12)
    assert same["compared"] >= 8 and same["equal"]
    assert same["entropy_max_abs_diff"] < 1e-4


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """``fn()`` on a daemon thread, started: (the thread, a dict that gets its "value" or its "error")."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box
