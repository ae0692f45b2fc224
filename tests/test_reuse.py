"""Reuse across requests: vision features per temporal patch and prompt prefixes change no answer; caller frames
sampled at a rate; token events; cancel during vision and prefill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.registry import family
from models.samples import render_frames
from runtime import reasoner as reasoner_module
from runtime import stream as stream_module
from runtime.reasoner import Reasoner, TokenEvent
from runtime.reuse import ReuseStore, held_bytes, nbytes

Q1, Q2 = "Which shape moves left?", "What color is the shape?"


def rgb_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    return [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=n, size=(96, 128), seed=seed)]


@pytest.fixture(scope="module")
def frames():
    return rgb_frames(8)


def pair(engine, backend, decode="dynamic"):
    """(with reuse, without) on one export."""
    return (Reasoner.load(engine, backend=backend, decode=decode, reuse_mb=64),
            Reasoner.load(engine, backend=backend, decode=decode, reuse_mb=0))


def same_answer(a, b, exact=False):
    assert a.token_ids == b.token_ids
    if exact:
        assert a.entropy == b.entropy
    else:
        assert np.allclose(a.entropy, b.entropy, rtol=0, atol=1e-6), np.abs(np.subtract(a.entropy, b.entropy)).max()


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_a_temporal_patch_is_encoded_alone(family_name, tiny, q3_tiny):
    """FRAME_LOCAL_VISION holds: encoding a clip's temporal patches one by one gives what encoding the clip gives."""
    from models import load_model
    from models.preprocess import VisionSettings, process_video

    fam = family(family_name)
    assert fam.FRAME_LOCAL_VISION
    ckpt = tiny if family_name == "qwen2_5_vl" else q3_tiny
    model = load_model(ckpt)
    cfg = model.cfg.vision
    pv, (t, h, w) = process_video(rgb_frames(8), VisionSettings.from_dir(ckpt))
    pv = torch.from_numpy(pv)
    with torch.no_grad():
        whole = model.visual(pv, *fam.vision_inputs((t, h, w), cfg).values())
        per = h * w
        parts = [model.visual(pv[i * per:(i + 1) * per], *fam.vision_inputs((1, h, w), cfg).values()) for i in range(t)]
    whole = whole if isinstance(whole, tuple) else (whole, None)
    parts = [p if isinstance(p, tuple) else (p, None) for p in parts]
    assert t == 4
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0], rtol=0, atol=1e-6)
    if whole[1] is not None and whole[1].shape[0]:
        torch.testing.assert_close(torch.cat([p[1] for p in parts], dim=1), whole[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_reuse_changes_no_answer(engine_dir, frames, backend, method):
    on, off = pair(engine_dir, backend)
    kw = dict(frames=frames, fps=2.0, max_new_tokens=12, method=method)
    first = on.ask(question=Q1, **kw)
    same_answer(first, off.ask(question=Q1, **kw), exact=True)  # nothing to reuse yet
    assert first.timings["reused_prompt_tokens"] == 0 and first.timings["reused_vision_patches"] == 0
    second = on.ask(question=Q2, **kw)  # the same clip, another question
    same_answer(second, off.ask(question=Q2, **kw))
    t = second.timings
    common = next(i for i, (a, b) in enumerate(zip(first.prompt_token_ids, second.prompt_token_ids)) if a != b)
    assert t["reused_prompt_tokens"] == common > first.prompt_token_ids.index(on.cfg.video_token_id)
    patches = len(frames) // 2  # temporal patches of two frames
    assert t["reused_vision_patches"] == patches  # every visual token was in the restored prefix: none encoded
    again = on.ask(question=Q1, **kw)  # the same request: restored whole, bit-identical
    same_answer(again, first, exact=True)
    assert again.timings["reused_prompt_tokens"] == len(first.prompt_token_ids)
    assert again.timings["reused_vision_patches"] == patches


@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_reuse_with_static_decode(engine_dir, frames, method):
    on, off = pair(engine_dir, "ort", decode="static")
    kw = dict(frames=frames, fps=2.0, max_new_tokens=10, method=method)
    on.ask(question=Q1, **kw)
    same_answer(on.ask(question=Q2, **kw), off.ask(question=Q2, **kw))
    same_answer(on.ask(question=Q1, **kw), off.ask(question=Q1, **kw), exact=True)


def test_overlapping_windows_reuse_vision(engine_dir):
    """A window sharing half its frames with the last one encodes only the new half, and answers as a cold run."""
    on, off = pair(engine_dir, "ort")
    stream = rgb_frames(12, seed=4)
    on.ask(frames=stream[:8], fps=2.0, question=Q1, max_new_tokens=4)
    warm = on.ask(frames=stream[4:12], fps=2.0, question=Q1, max_new_tokens=4)
    assert warm.timings["reused_vision_patches"] == 2  # of 4 temporal patches
    assert warm.timings["reused_prompt_tokens"] < warm.prompt_token_ids.index(on.cfg.video_token_id) + 1
    same_answer(warm, off.ask(frames=stream[4:12], fps=2.0, question=Q1, max_new_tokens=4), exact=True)


def test_reuse_on_qwen3_vl(q3_engine):
    on, off = pair(q3_engine, "ort")
    stream = rgb_frames(12, seed=5)
    kw = dict(fps=2.0, max_new_tokens=8, method="vreason")
    on.ask(frames=stream[:8], question=Q1, **kw)
    second = on.ask(frames=stream[:8], question=Q2, **kw)
    assert second.timings["reused_prompt_tokens"] > 0
    same_answer(second, off.ask(frames=stream[:8], question=Q2, **kw))
    shifted = on.ask(frames=stream[4:12], question=Q1, **kw)  # DeepStack features reused per patch too
    assert shifted.timings["reused_vision_patches"] == 2
    same_answer(shifted, off.ask(frames=stream[4:12], question=Q1, **kw))


def test_reuse_is_bounded_in_bytes():
    store = ReuseStore(1000)
    for i in range(10):
        assert store.put(("vision", i), i, 300)
        assert store.used <= 1000
    assert len(store) == 3 and store.evicted == 7
    assert store.get(("vision", 0)) is None and store.get(("vision", 9)) == 9
    assert not store.put(("vision", "big"), 0, 1001)  # alone over the budget: not kept
    off = ReuseStore(0)
    assert not off.enabled and not off.put(("vision", 1), 1, 1)


def test_reuse_budget_holds_across_requests(engine_dir):
    """The bound holds for the bytes the store really keeps alive (each tensor's whole storage), not only for
    what its entries were counted at: a vision entry is a compact copy, never a view into its group's output."""
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=1)
    for seed in range(4):
        r.ask(frames=rgb_frames(8, seed=seed), fps=2.0, question=Q1, max_new_tokens=2)
        vision = [t for entry in r.reuse.values("vision") for t in entry]
        prefixes = [t for p in r.reuse.values("prefix") for t in (*p.keys, *p.values, p.hidden)]
        assert vision and prefixes
        held = held_bytes(*vision, *prefixes)
        assert 0 < held == r.reuse.used <= 2**20
    one = r.reuse.values("vision")[0]
    r.reuse = ReuseStore(nbytes(*one) + 100)  # room for one patch of a group of several: the rest evicted
    r.ask(frames=rgb_frames(8, seed=9), fps=2.0, question=Q1, max_new_tokens=2)
    assert r.reuse.evicted > 0 and len(r.reuse) == 1
    assert held_bytes(*r.reuse.values("vision")[0]) == r.reuse.used <= r.reuse.budget


def test_caller_frames_are_sampled_at_a_rate(engine_dir):
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0)
    limit = r.limits["max_frames"]
    many = rgb_frames(limit + 8)
    thinned = r.prepare(frames=many, fps=2.0, question=Q1)  # more than the export takes: thinned evenly
    assert thinned.visuals[0].frames == limit
    # captured at 8 fps, sampled at 2: a quarter of the frames, 0.5 s apart
    p = r.prepare(frames=rgb_frames(16), frames_fps=8.0, fps=2.0, question=Q1)
    assert p.visuals[0].frames == 4
    assert p.visuals[0].span.seconds_per_grid == pytest.approx(1.0)  # two frames 0.5 s apart per temporal patch
    from models.errors import InputError

    with pytest.raises(InputError, match="frames_fps"):
        r.prepare(frames=rgb_frames(4), frames_fps=0, question=Q1)


def test_token_events(engine_dir, frames):
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0)
    s = r.stream(frames=frames, fps=2.0, question=Q1, max_new_tokens=10, events=True)
    events = list(s)
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.id for e in events] == s.result.token_ids
    assert "".join(e.text for e in events) == s.result.text
    assert np.allclose([e.entropy for e in events], s.result.entropy)
    assert 0 < s.result.timings["prepare_s"] < s.result.timings["ttft_s"]


def test_cancel_during_vision_and_prefill(engine_dir, monkeypatch):
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0)
    calls = {"vision": 0, "trunk": 0}
    encode, trunk = r.backend.encode_vision, r.backend.trunk

    def counting(kind, fn, stream):
        def wrapped(*a, **k):
            calls[kind] += 1
            stream.cancel()
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(reasoner_module, "VISION_GROUP", 1)
    s = r.stream(frames=rgb_frames(8), fps=2.0, question=Q1, max_new_tokens=8)
    monkeypatch.setattr(r.backend, "encode_vision", counting("vision", encode, s))
    assert list(s) == [] and s.result.token_ids == []
    assert calls["vision"] == 1  # of 4 temporal patches: stopped after the first call
    monkeypatch.setattr(r.backend, "encode_vision", encode)

    monkeypatch.setattr(stream_module, "PREFILL_CHUNK", 8)
    s = r.stream(frames=rgb_frames(8), fps=2.0, question=Q1, max_new_tokens=8)
    monkeypatch.setattr(r.backend, "trunk", counting("trunk", trunk, s))
    assert list(s) == [] and s.result.token_ids == []
    assert calls["trunk"] == 1  # the prompt is many chunks of 8: stopped after the first
    monkeypatch.setattr(r.backend, "trunk", trunk)
    # the Reasoner serves the next request as usual, chunked prefill giving the one-call answer
    chunked = r.ask(frames=rgb_frames(8), fps=2.0, question=Q1, max_new_tokens=8)
    monkeypatch.setattr(stream_module, "PREFILL_CHUNK", 0)
    whole = r.ask(frames=rgb_frames(8), fps=2.0, question=Q1, max_new_tokens=8)
    same_answer(chunked, whole)
