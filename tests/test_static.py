"""Static-shape decode (runtime.static): the same tokens and traces as the dynamic loop, on both tiny
checkpoints, for base, V-Reason and Lite; reuse across requests; chunked id reads; out-of-memory handling;
the synthetic benchmark on a small CPU shape."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from controller import VReasonConfig
from models import load_model
from models.errors import ResourceError, UserError
from models.samples import render_frames
from runtime.bench.__main__ import main as bench_main
from runtime.bench.synthetic import Runner, synthetic_prompt
from runtime.pool import KVPool
from runtime.reasoner import Reasoner

QUESTION = "Which shape moves left?"
STRONG = dict(lr=0.5, every=1, steps=2)  # visibly steers the tiny model


@pytest.fixture(scope="module")
def frames():
    return [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=4, size=(96, 128))]


@pytest.fixture(scope="module")
def both(engine_dir):
    return (Reasoner.load(engine_dir, backend="torch", decode="dynamic"),
            Reasoner.load(engine_dir, backend="torch", decode="static"))


@pytest.mark.parametrize("ctl", [None, STRONG], ids=["default", "strong"])
@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_static_equals_dynamic_on_each_checkpoint(any_checkpoint, method, ctl):
    model = load_model(any_checkpoint)
    runner = Runner(model, model.cfg, torch.float32, torch.device("cpu"), synthetic_prompt(model.cfg, 80, "cpu"), 16)
    cfg = VReasonConfig(**(ctl or {}))
    dyn = runner.run("dynamic", method, controller=cfg)
    sta = runner.run("static", method, controller=cfg)
    again = runner.run("static", method, controller=cfg)  # buffers reused from the previous request
    assert dyn["tokens"] == sta["tokens"] == again["tokens"]
    assert dyn["alpha"] == sta["alpha"] == again["alpha"]
    if method != "base":
        assert any(a != 0 for a in dyn["alpha"])


def test_strong_controller_changes_the_static_trace(any_checkpoint):
    model = load_model(any_checkpoint)
    runner = Runner(model, model.cfg, torch.float32, torch.device("cpu"), synthetic_prompt(model.cfg, 80, "cpu"), 16)
    base = runner.run("static", "base")
    steered = runner.run("static", "vreason", controller=VReasonConfig(**STRONG))
    assert base["tokens"] != steered["tokens"]


@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_reasoner_static_matches_dynamic_and_reuses_buffers(both, frames, method):
    dyn, sta = both
    other = [f[:, ::-1].copy() for f in frames]
    for i, fr in enumerate((frames, other, frames)):
        kw = dict(question=QUESTION, frames=fr, fps=2.0, method=method, max_new_tokens=12, controller=STRONG)
        a, b = dyn.ask(**kw), sta.ask(**kw)
        if i == 2:  # the first clip again: its whole prompt restored from the reuse store, on both paths
            assert a.timings["reused_prompt_tokens"] == b.timings["reused_prompt_tokens"] == len(b.prompt_token_ids)
        assert a.token_ids == b.token_ids and a.alpha == b.alpha
        assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) <= 1e-4
        assert max(abs(x - y) for x, y in zip(a.ema, b.ema)) <= 1e-4
        assert b.skipped_updates == 0 and b.config == a.config
    assert sta._sessions["cache"].capacity % 256 == 0


@pytest.mark.parametrize("method", ["base", "vreason"])
def test_sampled_tokens_match_for_a_seed(both, frames, method):
    from runtime.sampling import SamplingParams

    kw = dict(question=QUESTION, frames=frames, fps=2.0, method=method, max_new_tokens=16)
    a = both[0].ask(sampling=SamplingParams(temperature=1.0, top_k=50, seed=3), **kw)
    b = both[1].ask(sampling=SamplingParams(temperature=1.0, top_k=50, seed=3), **kw)
    assert a.token_ids == b.token_ids


def test_stream_and_chunks_give_the_same_answer(both, frames):
    _, sta = both
    kw = dict(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=20)
    whole = sta.ask(**kw)
    s = sta.stream(**kw)  # chunk 1: every token read as it comes
    text = "".join(s)
    assert s.result.token_ids == whole.token_ids and text == whole.text
    # a stop id inside a chunk ends the answer at that token
    stop = whole.token_ids[5]
    sta.stop_ids.add(stop)
    try:
        cut = sta.ask(**kw)
    finally:
        sta.stop_ids.discard(stop)
    assert cut.token_ids == whole.token_ids[: whole.token_ids.index(stop) + 1]


def test_non_finite_update_is_skipped_on_device(both, frames, monkeypatch):
    import controller.vreason as cv

    real = cv.entropy
    calls = {"n": 0}

    def poisoned(logits):
        h = real(logits)
        calls["n"] += 1
        return h * float("nan") if logits.requires_grad else h  # only the loss of an update sees NaN

    monkeypatch.setattr(cv, "entropy", poisoned)
    res = both[1].ask(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=6, method="vreason")
    assert calls["n"] > 0 and res.skipped_updates >= 1
    assert all(torch.isfinite(torch.tensor(res.entropy)))


def test_unknown_decode_mode_is_refused(engine_dir):
    with pytest.raises(UserError, match="decode mode"):
        Reasoner.load(engine_dir, backend="torch", decode="fast")


@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_static_graph_contract_on_onnx_runtime(engine_dir, frames, method):
    """The exported trunk called with the whole fixed-capacity cache and cache_length (static) answers as the
    growing-cache calls (dynamic) do."""
    dyn = Reasoner.load(engine_dir, backend="ort", decode="dynamic")
    sta = Reasoner.load(engine_dir, backend="ort", decode="static")
    assert sta.decode == "static" and dyn.decode == "dynamic"
    for fr in (frames, [f[::-1].copy() for f in frames]):
        kw = dict(question=QUESTION, frames=fr, fps=2.0, method=method, max_new_tokens=12, controller=STRONG)
        a, b = dyn.ask(**kw), sta.ask(**kw)
        assert a.token_ids == b.token_ids and a.alpha == b.alpha
        assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) <= 1e-4


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_out_of_memory_is_one_line_and_the_next_request_works(engine_dir, frames, monkeypatch, decode):
    import runtime.cache as rc

    r = Reasoner.load(engine_dir, backend="torch", decode=decode)
    real = rc.KVCache.allocate.__func__

    def explode(cls, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(rc.KVCache, "allocate", classmethod(explode))
    grow = KVPool._grow
    monkeypatch.setattr(KVPool, "_grow", explode)  # dynamic decode: the request's row of the pool
    with pytest.raises(ResourceError) as e:
        r.ask(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=6)
    msg = str(e.value)
    assert "\n" not in msg and "fewer frames" in msg and "fewer new tokens" in msg and "lower precision" in msg
    assert r.engine.waiting == 0 and r._sessions == {}
    monkeypatch.setattr(rc.KVCache, "allocate", classmethod(real))
    monkeypatch.setattr(KVPool, "_grow", grow)
    assert len(r.ask(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=6).token_ids) >= 1


def test_out_of_memory_through_the_cli(engine_dir, tmp_path, monkeypatch, capsys):
    import runtime.cache as rc
    from runtime.__main__ import main as runtime_main

    def explode(cls, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(rc.KVCache, "allocate", classmethod(explode))
    monkeypatch.setattr(KVPool, "_grow", explode)  # a pooled cache's row (the ort backend's fused graphs)
    code = runtime_main(["--engine", str(engine_dir), "--image", str(_image(tmp_path)), "--question", QUESTION,
                         "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: out of cpu memory") and "Traceback" not in "".join(err)


def test_synthetic_bench_on_a_small_cpu_shape(capsys):
    assert bench_main(["--synthetic", "small", "--device", "cpu", "--prompt-tokens", "64", "--new-tokens", "6",
                       "--repeats", "1", "--warmup", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["decode_tokens_per_s"]) == {"dynamic", "static", "vreason", "vreason-lite", "transformers"}
    assert rep["tokens_identical_to_dynamic"] == {"static": True}
    assert rep["weight_bytes_per_token"]["none"] > 0 and rep["vreason_token_time_ratio"]["none"] > 0


def test_synthetic_bench_saves_each_row_as_it_goes(tmp_path, monkeypatch, capsys):
    """--save: a run stopped part way (here by an error in the transformers row) leaves every row it measured;
    a finished run leaves the whole report."""
    import runtime.bench.synthetic as syn

    out = tmp_path / "rows.json"
    args = ["--synthetic", "small", "--device", "cpu", "--prompt-tokens", "64", "--new-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--save", str(out)]

    def stopped(*a, **k):
        raise MemoryError("stopped here")

    with monkeypatch.context() as m:
        m.setattr(syn, "transformers_decode", stopped)
        with pytest.raises(MemoryError):
            syn.run_synthetic(argparse.Namespace(
                synthetic="small", device="cpu", dtype=None, prompt_tokens=64, new_tokens=4, repeats=1, warmup=0,
                quantize=["none"], compile=False, transformers=True, save=out))
    part = json.loads(out.read_text())
    assert part["complete"] is False and set(part["rows"]) == {"dynamic", "static", "vreason", "vreason-lite"}
    assert part["rows"]["static"]["decode_tokens_per_s"] > 0 and part["by_scheme"]["none"]["weights_bytes"] > 0
    assert bench_main(args + ["--no-transformers"]) == 0
    done = json.loads(out.read_text())
    assert done["complete"] is True and set(done["decode_tokens_per_s"]) == set(part["rows"])
    assert not list(tmp_path.glob("*.part"))
    capsys.readouterr()
    assert bench_main(args[:-1] + [str(tmp_path / "rows.txt")]) == 1
    assert "must end in .json" in capsys.readouterr().err


def test_synthetic_bench_errors_are_one_line(capsys):
    assert bench_main(["--synthetic", "qwen9", "--device", "cpu"]) == 1
    assert "unknown synthetic model" in capsys.readouterr().err
    assert bench_main(["--synthetic", "small", "--device", "gpu"]) == 1
    assert "is not a device" in capsys.readouterr().err


def _image(tmp_path):
    import cv2

    p = tmp_path / "frame.png"
    cv2.imwrite(str(p), render_frames("circle", "red", "right", frames=1, size=(64, 64))[0])
    return p


def test_fused_projections_compute_the_same(any_checkpoint):
    from runtime.reasoner import fuse_projections

    model = load_model(any_checkpoint)
    h = model.cfg.text.hidden_size
    x = torch.randn(1, 7, h, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).view(1, 1, 7).expand(3, 1, 7)
    with torch.no_grad():
        ref = model.decoder(x, pos)
        before = sum(p.numel() for p in model.decoder.parameters())
        fuse_projections(model)
        out = model.decoder(x, pos)
    assert sum(p.numel() for p in model.decoder.parameters()) == before  # one copy of the weights, relaid
    assert not hasattr(model.decoder.layers[0].self_attn, "q_proj")
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
