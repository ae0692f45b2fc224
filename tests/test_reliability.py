"""Reliability: bad input, edge input, safety, faults and long runs (the guarantees in the README)."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from export.exporter import export_model
from export.manifest import ExportError, write_manifest
from models import CheckpointError, InputError, UserError, load_model
from models.samples import render_frames, sample_video, write_video
from runtime.__main__ import main as runtime_main
from runtime.reasoner import Reasoner
from runtime.sampling import SamplingParams

Q = "Which shape moves left?"


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    good = sample_video(d / "good.mp4", seconds=2)
    (d / "empty.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (d / "text.mp4").write_text("plain text, not a video\n" * 100)
    (d / "folder.mp4").mkdir()
    (d / "no-frames").mkdir()
    (d / "not-image.png").write_text("not an image")
    (d / "latin1.txt").write_bytes("Qu\xe9 pasa?".encode("latin-1"))
    return d


BAD_VIDEO = {"missing.mp4": "does not exist", "empty.mp4": "empty", "truncated.mp4": "video",
             "text.mp4": "video", "folder.mp4": "is a folder"}


@pytest.mark.parametrize("name", sorted(BAD_VIDEO))
def test_bad_video_files(reasoner, media, name):
    with pytest.raises(InputError, match=BAD_VIDEO[name]):
        reasoner.ask(video=media / name, question=Q)


@pytest.mark.parametrize("name", sorted(BAD_VIDEO))
def test_bad_video_files_on_the_cli(engine_dir, media, tmp_path, capsys, name):
    plot = tmp_path / "plot.png"
    rc = runtime_main(["--engine", str(engine_dir), "--video", str(media / name), "--question", Q,
                       "--plot", str(plot), "--json"])
    err = capsys.readouterr()
    assert rc == 1 and err.out == "" and len(err.err.strip().splitlines()) == 1
    assert err.err.startswith("error: ") and not plot.exists()


def test_other_bad_inputs(reasoner, media):
    with pytest.raises(InputError, match="holds no images"):
        reasoner.ask(frames=media / "no-frames", question=Q)
    with pytest.raises(InputError, match="could not be decoded"):
        reasoner.ask(image=media / "not-image.png", question=Q)
    with pytest.raises(InputError, match="question is empty"):
        reasoner.ask(question="   ")
    with pytest.raises(InputError, match="over this export's prompt limit"):
        reasoner.ask(question="word " * reasoner.limits["max_context"])
    with pytest.raises(InputError, match="RGB uint8"):
        reasoner.ask(frames=[np.zeros((4, 4), np.float32)], question=Q)
    with pytest.raises(InputError, match="color_order"):
        reasoner.ask(frames=[np.zeros((28, 28, 3), np.uint8)], question=Q, color_order="yuv")


def test_non_utf8_question_file(engine_dir, media, capsys):
    rc = runtime_main(["--engine", str(engine_dir), "--video", str(media / "good.mp4"),
                       "--question-file", str(media / "latin1.txt")])
    assert rc == 1 and "not UTF-8" in capsys.readouterr().err


def _broken_engines(engine_dir, root):
    out = {}
    out["missing"] = root / "nope"
    inc = root / "incomplete"
    shutil.copytree(engine_dir, inc)
    (inc / "head.safetensors").unlink()
    out["incomplete"] = inc
    tam = root / "tampered"
    shutil.copytree(engine_dir, tam)
    data = bytearray((tam / "trunk.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tam / "trunk.onnx").write_bytes(bytes(data))
    out["tampered"] = tam
    other = root / "other-model"
    shutil.copytree(engine_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model_type"] = "llava"
    (other / "manifest.json").write_text(json.dumps(m))
    out["other-model"] = other
    old = root / "old-format"
    shutil.copytree(engine_dir, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    out["old-format"] = old
    return out


ENGINE_ERRORS = {"missing": "does not exist", "incomplete": "head.safetensors: missing",
                 "tampered": "trunk.onnx: sha256 differs", "other-model": "not supported",
                 "old-format": "format version 99"}


def test_broken_engine_directories(engine_dir, tmp_path, media, capsys):
    for name, path in _broken_engines(engine_dir, tmp_path).items():
        with pytest.raises(ExportError, match=ENGINE_ERRORS[name]):
            Reasoner.load(path)
        rc = runtime_main(["--engine", str(path), "--video", str(media / "good.mp4"), "--question", Q])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and ENGINE_ERRORS[name] in err[0], (name, err)


def test_corrupt_safetensors_at_export(tiny, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        export_model(bad, tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- edge input that must simply work ----------------------------------------------------------------------

def test_one_frame_video(reasoner, tmp_path):
    one = write_video(tmp_path / "one.mp4", render_frames(frames=1))
    res = reasoner.ask(video=one, question=Q, max_new_tokens=3)
    assert len(res.token_ids) >= 1


def test_long_video_is_sampled_within_budget_and_streamed(reasoner, tmp_path, monkeypatch):
    import models.video as mv

    long = write_video(tmp_path / "long.mp4", render_frames(frames=600, size=(48, 64)), fps=30.0)
    real = mv._cv2()
    kept = []

    class Capture:
        def __init__(self, path):
            self.cap = real.VideoCapture(path)

        def __getattr__(self, name):
            return getattr(self.cap, name)

        def retrieve(self):
            kept.append(1)
            return self.cap.retrieve()

    proxy = type("cv2", (), {"VideoCapture": Capture, "__getattr__": lambda s, n: getattr(real, n)})()
    monkeypatch.setattr(mv, "_cv2", lambda: proxy)
    prompt = reasoner.prepare(video=long, question=Q, max_new_tokens=4)
    limit = reasoner.limits["max_frames"]
    assert len(kept) <= limit  # only the sampled frames were converted and held
    t = prompt.visuals[0].span.grid_thw[0]
    assert 2 <= t * 2 <= limit


@pytest.mark.parametrize("shape", [(20, 1000), (1000, 20), (3000, 4000), (28, 28), (5, 7)])
def test_extreme_image_sizes_fit_the_pixel_budget(reasoner, shape):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    prompt = reasoner.prepare(image=img, question=Q, max_new_tokens=2)
    _, gh, gw = prompt.visuals[0].span.grid_thw
    s = reasoner.settings
    assert s.min_pixels <= gh * gw * 14 * 14 <= s.max_pixels


def test_bgr_frames_with_color_order_equal_rgb_frames(reasoner):
    bgr = render_frames("circle", "red", "right", frames=4)
    rgb = [f[:, :, ::-1].copy() for f in bgr]
    a = reasoner.ask(frames=rgb, question=Q, max_new_tokens=6)
    b = reasoner.ask(frames=bgr, color_order="bgr", question=Q, max_new_tokens=6)
    c = reasoner.ask(frames=bgr, question=Q, max_new_tokens=6)  # BGR passed as RGB: a different input
    assert a.token_ids == b.token_ids and a.entropy == b.entropy
    assert c.entropy != a.entropy


# -- safety ------------------------------------------------------------------------------------------------

def test_checkpoint_code_is_never_executed(tiny, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny, d)
    marker = tmp_path / "pwned"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.Cfg"}
    (d / "config.json").write_text(json.dumps(cfg))
    load_model(d)
    out = export_model(d, tmp_path / "exp", quiet=True, validate=False)
    Reasoner.load(out).ask(question=Q, max_new_tokens=2)
    assert not marker.exists()


def test_chat_template_cannot_escape_its_sandbox(engine_dir, tmp_path):
    d = tmp_path / "engine"
    shutil.copytree(engine_dir, d)
    (d / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    write_manifest(d, json.loads((d / "manifest.json").read_text()))  # a consistent, hostile export
    with pytest.raises(CheckpointError, match="sandbox"):
        Reasoner.load(d).ask(question=Q, max_new_tokens=2)


# -- faults ------------------------------------------------------------------------------------------------

def test_cancelled_requests_leave_the_next_one_unaffected(reasoner):
    base = reasoner.ask(question=Q, max_new_tokens=10)
    s = reasoner.stream(question=Q, max_new_tokens=10)
    it = iter(s)
    next(it)  # the consumer stops after one piece and keeps the stream
    assert reasoner.ask(question=Q, max_new_tokens=10).token_ids == base.token_ids
    for _ in reasoner.stream(question=Q, max_new_tokens=10):
        break  # a consumer that breaks out of its loop
    s2 = reasoner.stream(question=Q, max_new_tokens=10, events=True)  # one event per token
    for i, _ in enumerate(s2):
        if i == 1:
            s2.cancel()  # takes effect after the current token
    got = s2.result.token_ids  # the engine runs ahead of its consumer: it stops at the token it is on
    assert 2 <= len(got) <= len(base.token_ids) and got == base.token_ids[: len(got)]
    assert reasoner.ask(question=Q, max_new_tokens=10).token_ids == base.token_ids
    assert reasoner.engine.waiting == 0


# -- long runs ---------------------------------------------------------------------------------------------

def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_two_hundred_requests_without_memory_growth(reasoner, capsys):
    frames = [f[:, :, ::-1].copy() for f in render_frames(frames=4, size=(64, 64))]
    params = dict(frames=frames, question=Q, max_new_tokens=8, method="vreason",
                  sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=11))
    first = reasoner.ask(**{**params, "sampling": SamplingParams(temperature=1.0, top_p=0.9, seed=11)})
    rss = []
    for _ in range(200):
        res = reasoner.ask(**{**params, "sampling": SamplingParams(temperature=1.0, top_p=0.9, seed=11)})
        assert res.token_ids == first.token_ids and res.entropy == first.entropy
        rss.append(_rss())
    after_warmup = np.array(rss[20:], dtype=np.float64)
    slope = np.polyfit(np.arange(after_warmup.size), after_warmup, 1)[0]  # bytes per request
    with capsys.disabled():
        print(f"\n200 requests: RSS slope after warm-up {slope / 1024:.2f} KiB/request, "
              f"RSS {after_warmup[0] / 2**20:.1f} -> {after_warmup[-1] / 2**20:.1f} MiB")
    assert slope < 16 * 1024  # < 16 KiB per request: < 3 MiB over the whole run


def test_threads_sharing_a_reasoner_get_correct_answers(reasoner):
    questions = ["Which shape moves left?", "What color is the circle?", "How many squares?"]
    want = {q: reasoner.ask(question=q, max_new_tokens=8).token_ids for q in questions}
    got, errors = {}, []

    def worker(q):
        try:
            for _ in range(3):
                got.setdefault(q, []).append(reasoner.ask(question=q, max_new_tokens=8).token_ids)
        except UserError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(got[q] == [want[q]] * 3 for q in questions)
