"""The engine: requests from many threads on one Reasoner. A consumer that pauses, keeps an unfinished stream,
abandons or cancels it delays no other request and deadlocks nothing; nested requests work; every finished
answer equals the same request run alone."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.reasoner import Reasoner
from tests.helpers import in_thread

QUESTIONS = ["Which shape moves left?", "What color is the circle?", "How many squares?", "Which way?"]
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds: far above what these requests take; reached only if something hangs


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir, backend="ort", reuse_mb=0)


@pytest.fixture(scope="module")
def solo(reasoner):
    """Each question's answer, asked alone."""
    return {q: reasoner.ask(question=q, max_new_tokens=10).token_ids for q in QUESTIONS}


def test_a_paused_consumer_delays_no_other_request(reasoner, solo):
    """Thread A pauses inside its stream's loop until thread B's request has been answered: B must be answered
    while A is paused (before, A held the model's lock across its yield and B waited for it)."""
    answered = threading.Event()

    def b():
        ids = reasoner.ask(question=QUESTIONS[1], max_new_tokens=10).token_ids
        answered.set()
        return ids

    def a():
        ids = []
        for i, event in enumerate(reasoner.stream(question=QUESTIONS[0], max_new_tokens=10, events=True)):
            ids.append(event.id)
            if i == 1:
                t, box = in_thread(b)
                if not answered.wait(TIMEOUT):  # the pause: until B has its answer
                    raise AssertionError("B was not answered while A paused in its stream")
                t.join()
                assert box["value"] == solo[QUESTIONS[1]]
        return ids

    t, box = in_thread(a)
    t.join(TIMEOUT + 10)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert box["value"] == solo[QUESTIONS[0]]  # A's answer, whole, after its pause


def test_a_kept_unfinished_stream_and_a_request_from_another_thread_do_not_deadlock(reasoner, solo):
    """Thread A keeps an unfinished stream, thread B makes a request, then A asks again: each is answered (before,
    A's second request blocked forever: the one slot that tracked unfinished streams had been taken by B's)."""
    held = reasoner.stream(question=QUESTIONS[0], max_new_tokens=10)
    it = iter(held)
    next(it)  # A keeps it unfinished
    t, box = in_thread(lambda: reasoner.ask(question=QUESTIONS[1], max_new_tokens=10).token_ids)
    t.join(TIMEOUT)
    assert not t.is_alive() and box.get("value") == solo[QUESTIONS[1]]
    t, box = in_thread(lambda: reasoner.ask(question=QUESTIONS[2], max_new_tokens=10).token_ids)  # A again
    t.join(TIMEOUT)
    assert not t.is_alive() and box.get("value") == solo[QUESTIONS[2]]
    rest = list(it)  # the kept stream still has its whole answer
    assert held.result.token_ids == solo[QUESTIONS[0]] and len(rest) >= 1


def test_a_request_made_inside_another_streams_loop_leaves_the_outer_stream_whole(reasoner, solo):
    """Before, the inner request silently closed the outer stream (1 token of 10, no error)."""
    outer = reasoner.stream(question=QUESTIONS[0], max_new_tokens=10, events=True)
    inner = []
    for i, _ in enumerate(outer):
        if i == 0:
            inner.append(reasoner.ask(question=QUESTIONS[1], max_new_tokens=10).token_ids)
    assert outer.result.token_ids == solo[QUESTIONS[0]] and len(outer.result.token_ids) == 10
    assert inner == [solo[QUESTIONS[1]]]


def test_eight_threads_of_five_requests_some_abandoning_or_cancelling(reasoner, solo):
    """8 threads x 5 requests on one Reasoner; some break out of their stream, some cancel it midway, some keep it
    unfinished: all finish within the timeout, and every answer that ran to its end equals its solo answer."""
    finished, errors = [], []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        kept = []
        try:
            for _ in range(5):
                q = rng.choice(QUESTIONS)
                how = rng.choice(["ask", "ask", "stream", "abandon", "cancel", "keep"])
                if how == "ask":
                    finished.append((q, reasoner.ask(question=q, max_new_tokens=10).token_ids))
                    continue
                s = reasoner.stream(question=q, max_new_tokens=10, events=True)
                for i, _ in enumerate(s):
                    if how == "abandon" and i == 2:
                        break
                    if how == "cancel" and i == 2:
                        s.cancel()
                    if how == "keep" and i == 1:
                        kept.append(s)
                        break
                if how == "stream":
                    finished.append((q, s.result.token_ids))
                elif how == "cancel":
                    assert s.result.token_ids == solo[q][: len(s.result.token_ids)]  # a prefix of the answer
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert finished and all(ids == solo[q] for q, ids in finished)
    assert reasoner.ask(question=QUESTIONS[3], max_new_tokens=10).token_ids == solo[QUESTIONS[3]]


def test_queue_time_is_reported(reasoner):
    r = reasoner.ask(question=QUESTIONS[0], max_new_tokens=2)
    assert r.timings["queue_s"] >= 0.0


# -- several requests running at once (max_batch), taking turns; the KV budget --------------------------------------

def _solo_then_together(r, requests: list[dict]) -> tuple[list, list]:
    """Each request alone, then all of them at once: prepared first, then handed to the engine in one go (threads
    would start them microseconds to milliseconds apart, and a tiny model's request can end in that time)."""
    alone = [r.ask(**kw) for kw in requests]
    streams = [r.stream(**kw) for kw in requests]
    channels = [r.engine.submit(s._run, kv=s.kv) for s in streams]
    for channel in channels:
        for _ in channel:
            pass
    return alone, [s.result for s in streams]


@pytest.mark.parametrize("export,trunk", [("fp32", "standard"), ("fp32", "fused"), ("int4", "fused"),
                                          ("qwen3", "fused"), ("qwen3", "standard"), ("fp32", "torch"),
                                          ("qwen3", "torch"), ("fp32", "torch-static"), ("qwen3", "torch-static"),
                                          ("fp32", "fused-static"), ("int4", "standard")])
def test_requests_running_together_equal_each_alone(request, monkeypatch, export, trunk):
    """Base, V-Reason and Lite requests of different prompt lengths (a clip or none, short and long questions),
    running four at a time, each give what they give alone: the same tokens, the same entropies (1e-5), the same
    V-Reason trace; and they did run together: their decode steps, V-Reason's updates and its recomputes in one
    call for all (``trunk_rows``, ``head_rows``, ``VReason.update_rows``). On ort with the exported standard graph
    (rows of a token-major pool, each row's cache_length: the contract TensorRT engines run), with the fused one
    (fp32 and int4 weights, both families; dynamic decode, and static), and on the torch backend (dynamic decode,
    and static: the same calls at fixed shapes over the pool's whole buffers, its rows a power of two; CUDA graphs
    of them where a GPU is)."""
    from models.samples import render_frames

    d = request.getfixturevalue({"fp32": "engine_dir", "int4": "int4_engine", "qwen3": "q3_engine"}[export])
    if trunk.startswith("torch"):  # the PyTorch backend
        r = Reasoner.load(d, backend="torch", reuse_mb=0, max_batch=4,
                          decode="static" if trunk == "torch-static" else "dynamic")
        assert (r.backend.fixed is not None) == (trunk == "torch-static")
    else:  # ort; static decode runs the same batched calls (already over the pool's whole buffers)
        r = Reasoner.load(d, backend="ort", reuse_mb=0, max_batch=4, ort_trunk=trunk.removesuffix("-static"),
                          decode="static" if trunk.endswith("-static") else "dynamic")
    assert r.pool is not None and r.pool.head_major == (trunk != "standard")
    widths = []
    updates = []
    from controller.vreason import VReason  # the rows each batched call decoded

    rows, head_rows, update_rows = r.backend.trunk_rows, r.backend.head_rows, VReason.update_rows
    r.backend.trunk_rows = lambda calls: (widths.append(len(calls)), rows(calls))[1]
    r.backend.head_rows = lambda calls: (widths.append(len(calls)), head_rows(calls))[1]
    decode_rows = r.backend.decode_rows  # (trunk and head in one call: the fused trunk with the head graph)
    assert (decode_rows is not None) == (trunk in ("fused", "fused-static"))
    if decode_rows is not None:
        r.backend.decode_rows = lambda calls: (widths.append(len(calls)), decode_rows(calls))[1]
    monkeypatch.setattr(VReason, "update_rows", staticmethod(lambda calls: (updates.append(len(calls)),
                                                                            update_rows(calls))[1]))
    frames = [f[:, :, ::-1].copy() for f in render_frames("circle", "red", "right", frames=4)]  # RGB
    controller = {"every": 1, "steps": 1}  # an update at every token: the two V-Reason requests update together
    requests = [dict(question=QUESTIONS[0], max_new_tokens=12),
                dict(frames=frames, fps=4.0, question=QUESTIONS[1] * 6, max_new_tokens=9, method="vreason",
                     controller=controller),
                dict(frames=frames, fps=4.0, question=QUESTIONS[2], max_new_tokens=10, method="vreason-lite",
                     controller=controller),
                dict(frames=frames, fps=4.0, question=QUESTIONS[3], max_new_tokens=11, template="plain")]
    alone, together = _solo_then_together(r, requests)
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        assert b.entropy == pytest.approx(a.entropy, abs=1e-5)
        assert b.alpha == pytest.approx(a.alpha, abs=1e-6) and b.ema == pytest.approx(a.ema, abs=1e-5)
    assert all(a.timings["batch_mean"] == 1.0 for a in alone)
    assert max(b.timings["batch_mean"] for b in together) > 1.5  # they ran together, not one after the other
    assert max(widths) == 4 and set(r.pool.holders) == {None}  # four rows in one call; every row given back
    assert max(updates) == 2  # the two V-Reason requests' updates in one call


def test_v_reason_requests_a_round_apart_update_together(engine_dir, monkeypatch):
    """V-Reason updates on every second token. Of two such requests, one a round behind the other would update on
    the other rounds: an update call on every round. It waits one round before its first step instead
    (``Running.in_phase``), so that their updates run in one call; its answer is unchanged. A request alone never
    waits, also after others of its period have finished."""
    from controller.vreason import VReason
    from models.samples import render_frames
    from runtime.engine import TICK

    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    widths: list[int] = []
    update_rows = VReason.update_rows
    monkeypatch.setattr(VReason, "update_rows", staticmethod(lambda calls: (widths.append(len(calls)),
                                                                            update_rows(calls))[1]))
    frames = [f[:, :, ::-1].copy() for f in render_frames("circle", "red", "right", frames=4)]  # RGB
    request = dict(frames=frames, fps=4.0, question=QUESTIONS[1], max_new_tokens=12, method="vreason")
    alone = r.ask(**request)
    assert alone.timings["align_s"] == 0.0 and set(widths) == {1}
    widths.clear()
    first, second = r.stream(**request), r.stream(**request)

    queued = threading.Event()

    def gate(queue_s, running):  # runs alone (max_batch 1) until both are queued: they are then taken in together
        while not queued.is_set():
            yield TICK
        r.engine.max_batch = 4

    def behind(queue_s, running):  # the same request, started a round after the first
        yield TICK
        yield from second._run(queue_s, running)

    r.engine.max_batch = 1
    channels = [r.engine.submit(gate), r.engine.submit(first._run, kv=first.kv), r.engine.submit(behind, kv=second.kv)]
    queued.set()
    for channel in channels:
        for _ in channel:
            pass
    for res in (first.result, second.result):
        assert res.token_ids == alone.token_ids and res.entropy == pytest.approx(alone.entropy, abs=1e-5)
        assert res.alpha == pytest.approx(alone.alpha, abs=1e-6)
    assert first.result.timings["align_s"] == 0.0 < second.result.timings["align_s"]
    assert widths.count(2) >= 4  # (with the second a round out of phase, none would be)
    assert r.ask(**request).timings["align_s"] == 0.0  # alone again: no phase left over from the two


def test_a_request_alone_is_one_row_on_the_fused_float_graphs(engine_dir, int4_engine):
    """On the ort backend's fused fp32 graphs a row's numbers are the same in a call of one row as of several
    (prepacked matmuls: ``OrtBackend.pool_min_rows``), so a request alone is decoded as one row, also after a
    burst has grown the pool (its calls cover the rows up to the last one held: ``KVPool.span``), and gives the
    tokens it gives with others. A quantized export keeps two rows at least (MatMulNBits rounds one row
    differently from several)."""
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4, ort_trunk="fused")
    assert r.backend.pool_min_rows == 1
    spans: list[int] = []
    decode_rows = r.backend.decode_rows  # (the fused trunk and the head graph, in one call a step)
    r.backend.decode_rows = lambda calls: (spans.append(calls[0][2].pool.span), decode_rows(calls))[1]
    request = dict(question=QUESTIONS[0], max_new_tokens=8)
    first = r.ask(**request)
    assert set(spans) == {1} and r.pool.rows == 1
    alone, together = _solo_then_together(r, [request] + [dict(question=q, max_new_tokens=8) for q in QUESTIONS[1:]])
    assert max(spans) == 4 and r.pool.rows == 4
    spans.clear()
    after = r.ask(**request)  # the pool keeps its four rows; the request's calls cover its one
    assert set(spans) == {1} and r.pool.rows == 4
    for res in (alone[0], after):  # one row each time: the same numbers, bit for bit
        assert res.token_ids == first.token_ids and res.entropy == first.entropy
    # with others: the same tokens; the entropies to float rounding (the head graph's sums over the vocabulary
    # are split across threads differently for one row than for several)
    assert together[0].token_ids == first.token_ids
    assert together[0].entropy == pytest.approx(first.entropy, abs=1e-6)
    assert Reasoner.load(int4_engine, backend="ort", reuse_mb=0, max_batch=4).backend.pool_min_rows == 2


@pytest.mark.parametrize("backend,trunk", [("ort", "standard"), ("torch", "dynamic")])
def test_after_a_burst_a_request_alone_covers_only_its_rows(engine_dir, monkeypatch, backend, trunk):
    """The exported standard graph's calls (what TensorRT engines run) and the torch backend's cover the pool's
    rows up to the last one a request holds (``KVPool.span``), as the fused graphs' do: after a burst has grown
    the pool to four rows, a request alone is decoded as the rows it was decoded as before the burst (one on
    torch, two on the standard graph: ``pool_min_rows``), with the same numbers bit for bit."""
    import runtime.backends.ort as ort_backend
    import runtime.pool as pool_module

    kw = {"ort_trunk": trunk} if backend == "ort" else {}
    r = Reasoner.load(engine_dir, backend=backend, reuse_mb=0, max_batch=4, **kw)
    covered: list[int] = []
    for module in (ort_backend, pool_module):  # the rows each batched call's inputs cover
        inner = module.row_inputs
        monkeypatch.setattr(module, "row_inputs", lambda *a, _inner=inner, **k: (
            lambda out: (covered.append(out[0].shape[0]), out)[1])(_inner(*a, **k)))
    request = dict(question=QUESTIONS[0], max_new_tokens=8)
    first = r.ask(**request)
    before = set(covered)
    assert before == {r.backend.pool_min_rows}
    _solo_then_together(r, [dict(question=q, max_new_tokens=8) for q in QUESTIONS])
    assert max(covered) == r.pool.rows == 4
    covered.clear()
    after = r.ask(**request)
    assert set(covered) == before and r.pool.rows == 4
    assert after.token_ids == first.token_ids and after.entropy == first.entropy


def test_a_long_prefill_takes_turns_with_a_running_request(engine_dir, monkeypatch):
    """While a long prompt is prefilled chunk by chunk, a request already decoding gets a token between every two
    chunks: its wait between tokens is at most one decode step plus one prefill chunk (seen in the order of the
    trunk's calls)."""
    import runtime.stream

    monkeypatch.setattr(runtime.stream, "PREFILL_CHUNK", 16)
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=2)
    calls: list[int] = []
    trunk = r.backend.trunk

    def logged(embeds, *args, **kwargs):
        calls.append(embeds.shape[1])
        return trunk(embeds, *args, **kwargs)

    monkeypatch.setattr(r.backend, "trunk", logged)
    rows = r.backend.decode_rows  # the decode steps, batched (the fused trunk and the head graph)
    monkeypatch.setattr(r.backend, "decode_rows", lambda calls_: (calls.append(1), rows(calls_))[1])
    long = r.stream(question=" ".join(QUESTIONS * 12), max_new_tokens=2)  # prepared here, submitted below
    pieces = iter(r.stream(question=QUESTIONS[0], max_new_tokens=300, events=True))
    next(pieces)  # the first request is decoding
    list(long)
    rest = list(pieces)
    assert len(long.result.prompt_token_ids) > 5 * 16 and len(rest) > 100
    decoding = calls.index(1)  # the first request's first decode step: its own prefill chunks come before
    chunks = [i for i, n in enumerate(calls) if n == 16 and i > decoding]  # the long prompt's full chunks
    assert len(chunks) >= 5
    between = [calls[a + 1:b] for a, b in zip(chunks, chunks[1:])]
    assert all(1 in gap for gap in between), calls  # a decode step of the running request between every two


def test_one_prefill_chunk_a_round_the_fewest_tokens_left_first(engine_dir, monkeypatch):
    """Of several prompts prefilling at once, one chunk a round goes to the one with the fewest tokens left (the
    first admitted of equals): a running request gets a token between every two chunks however many prompts are
    prefilling, two equal prompts submitted together are prefilled one after the other, and a short prompt
    submitted with them is prefilled first."""
    import runtime.stream

    monkeypatch.setattr(runtime.stream, "PREFILL_CHUNK", 16)
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    calls: list = []  # (tokens, the cache of the request a prefill chunk went to; None: the batched decode step)
    trunk, rows = r.backend.trunk, r.backend.decode_rows

    def logged(embeds, positions, cache, *args, **kwargs):
        calls.append((embeds.shape[1], id(cache)))
        return trunk(embeds, positions, cache, *args, **kwargs)

    monkeypatch.setattr(r.backend, "trunk", logged)
    monkeypatch.setattr(r.backend, "decode_rows", lambda calls_: (calls.append((1, None)), rows(calls_))[1])
    long_question = " ".join(QUESTIONS * 12)
    first, second = (r.stream(question=long_question, max_new_tokens=2) for _ in range(2))
    short = r.stream(question=QUESTIONS[0], max_new_tokens=2)
    pieces = iter(r.stream(question=QUESTIONS[1], max_new_tokens=300, events=True))
    next(pieces)  # the running request is decoding
    start = len(calls)
    channels = [r.engine.submit(s._run, kv=s.kv, prefill=len(s.prompt.ids)) for s in (first, second, short)]
    for channel in channels:
        list(channel)
    rest = list(pieces)
    assert len(rest) > 100 and len(first.result.prompt_token_ids) > 5 * 16
    after = calls[start:]
    chunks = [(i, cache) for i, (_, cache) in enumerate(after) if cache is not None]
    caches = [cache for _, cache in chunks]
    # whose chunk came when: the short prompt's first, then all of the first long one's, then the second's
    order = [c for k, c in enumerate(caches) if k == 0 or caches[k - 1] != c]
    assert len(order) == 3 and caches.count(order[1]) > 5 and caches.count(order[2]) > 5, order
    assert caches.count(order[0]) < caches.count(order[1]) == caches.count(order[2])
    last_decode = max(i for i, (_, cache) in enumerate(after) if cache is None)
    between = [after[a + 1:b] for (a, _), (b, _) in zip(chunks, chunks[1:]) if b < last_decode]
    assert len(between) > 10 and all((1, None) in gap for gap in between), after


def test_a_prefill_waiting_for_its_turn_leaves_at_once_when_cancelled(engine_dir, monkeypatch):
    import runtime.stream

    monkeypatch.setattr(runtime.stream, "PREFILL_CHUNK", 16)
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    chunks: list[int] = []
    trunk = r.backend.trunk

    def logged(embeds, positions, cache, *args, **kwargs):
        chunks.append(id(cache))
        return trunk(embeds, positions, cache, *args, **kwargs)

    monkeypatch.setattr(r.backend, "trunk", logged)
    first, second = (r.stream(question=" ".join(QUESTIONS * 12), max_new_tokens=2) for _ in range(2))
    channels = [r.engine.submit(s._run, kv=s.kv, prefill=len(s.prompt.ids), stopped=s._cancel.is_set)
                for s in (first, second)]
    second.cancel()  # its prefill's turn comes after the first's whole prefill
    list(channels[1])
    left_at = len(chunks)
    list(channels[0])
    assert second.result.token_ids == [] and len(first.result.token_ids) == 2
    assert left_at < len(chunks) - 5  # it left while the first was still prefilling


def test_a_prefill_passed_over_too_long_goes_next():
    from runtime.engine import PREFILL_AGING, Running, prefill_turn

    def row(left, passed=0):
        running = Running()
        running.prefill_left, running.passed_over = left, passed
        return [None, None, None, 0, running]

    decoding, a, b, c = row(None), row(300), row(40), row(40)
    assert prefill_turn([decoding]) is None
    assert prefill_turn([decoding, a, b, c]) is b  # the fewest tokens left, the first admitted of equals
    a[4].passed_over = PREFILL_AGING - 1
    assert prefill_turn([decoding, a, b, c]) is b
    a[4].passed_over = PREFILL_AGING
    assert prefill_turn([decoding, a, b, c]) is a


def test_a_new_requests_vision_encoding_takes_turns_with_a_running_request(engine_dir, monkeypatch):
    """The vision encoder's calls for a new request's clip (groups of temporal patches) also take turns with a
    request already decoding: a decode step of it between every two calls."""
    from models.samples import render_frames

    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=2)
    calls: list[str] = []
    trunk, vision = r.backend.trunk, r.backend.encode_vision

    def logged_trunk(embeds, *args, **kwargs):
        calls.append("decode" if embeds.shape[1] == 1 else "prefill")
        return trunk(embeds, *args, **kwargs)

    def logged_vision(*args, **kwargs):
        calls.append("vision")
        return vision(*args, **kwargs)

    monkeypatch.setattr(r.backend, "trunk", logged_trunk)
    monkeypatch.setattr(r.backend, "encode_vision", logged_vision)
    rows = r.backend.decode_rows  # the decode steps, batched (the fused trunk and the head graph)
    monkeypatch.setattr(r.backend, "decode_rows", lambda calls_: (calls.append("decode"), rows(calls_))[1])
    frames = [f[:, :, ::-1].copy() for f in render_frames("circle", "red", "right", frames=32)]
    clip = r.stream(frames=frames, fps=4.0, question=QUESTIONS[0], max_new_tokens=2)  # 16 temporal patches
    pieces = iter(r.stream(question=QUESTIONS[1], max_new_tokens=300, events=True))
    next(pieces)  # the first request is decoding
    list(clip)
    assert len(list(pieces)) > 100
    seen = [i for i, c in enumerate(calls) if c == "vision"]
    assert len(seen) >= 4  # groups of VISION_GROUP patches
    assert all("decode" in calls[a + 1:b] for a, b in zip(seen, seen[1:])), calls


def test_the_kv_budget_holds_requests_back_and_refuses_one_that_never_fits(engine_dir):
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    need = r.kv_need(len(r.prepare(question=QUESTIONS[0], max_new_tokens=10).ids) + 10)
    small = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4, kv_mb=need * 1.5 / 2**20)
    # two such requests do not fit together: the second waits for the first, they never run side by side
    alone, together = _solo_then_together(small, [dict(question=QUESTIONS[0], max_new_tokens=10)] * 2)
    assert all(b.token_ids == alone[0].token_ids for b in together)
    assert all(b.timings["batch_mean"] == 1.0 for b in together)
    assert max(b.timings["queue_s"] for b in together) > 0
    from runtime import ResourceError

    with pytest.raises(ResourceError, match="kv_mb") as e:
        small.ask(question=QUESTIONS[0], max_new_tokens=400)
    assert len(str(e.value).splitlines()) == 1
    assert small.ask(question=QUESTIONS[0], max_new_tokens=10).token_ids == alone[0].token_ids


def test_the_kv_budget_counts_every_row_at_the_longest_capacity(engine_dir):
    """A pool's rows all have the longest running request's capacity, so a short request beside a long one holds as
    much as the long one. The budget counts them so (``KVPool.held_bytes``): two that would fit by their own sizes
    but not as two rows of the long one's capacity do not run together, and the pool's buffers never held more than
    the budget."""
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    short = dict(question=QUESTIONS[0], max_new_tokens=8)
    long = dict(question=" ".join(QUESTIONS * 6), max_new_tokens=300)
    s_need = r.kv_need(len(r.prepare(**short).ids) + 8)
    l_need = r.kv_need(len(r.prepare(**long).ids) + 300)
    assert l_need > 2 * s_need
    budget = l_need + (l_need + s_need) // 2  # over the two's own sizes, under two rows of the long one
    small = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4, kv_mb=budget / 2**20)
    alone, together = _solo_then_together(small, [long, short])
    assert [b.token_ids for b in together] == [a.token_ids for a in alone]
    assert all(b.timings["batch_mean"] == 1.0 for b in together) and together[1].timings["queue_s"] > 0
    assert small.pool.peak_bytes <= budget


def test_static_decode_of_several_requests(engine_dir, monkeypatch):
    """Static decode runs one request at a time by default (its whole step captured); with max_batch > 1 the torch
    backend runs its batched calls at fixed shapes (the pool's rows in powers of two, a CUDA graph per pool shape on
    a GPU), ort its batched calls as they are (already over the pool's whole buffers); a backend that cannot
    (TensorRT) refuses with one line."""
    from runtime import InputError
    from runtime.backends.ort import OrtBackend

    assert Reasoner.load(engine_dir, backend="ort", decode="static").max_batch == 1
    r = Reasoner.load(engine_dir, backend="ort", decode="static", max_batch=2, reuse_mb=0)
    assert r.pool is not None and r.pool.row_buckets
    assert r.ask(question=QUESTIONS[0], max_new_tokens=4).token_ids == \
        Reasoner.load(engine_dir, backend="ort", decode="static", reuse_mb=0).ask(question=QUESTIONS[0],
                                                                                 max_new_tokens=4).token_ids
    monkeypatch.setattr(OrtBackend, "batch_static", False)
    with pytest.raises(InputError, match="max_batch=2 needs dynamic decode on the ort backend"):
        Reasoner.load(engine_dir, backend="ort", decode="static", max_batch=2)
    r = Reasoner.load(engine_dir, backend="torch", decode="static", max_batch=3, reuse_mb=0)
    assert r.pool is not None and r.pool.row_buckets and r.backend.fixed is not None
    r.ask(question=QUESTIONS[0], max_new_tokens=3)
    assert r.pool.rows == 1
    caches = [r.cache_for(10) for _ in range(3)]
    assert r.pool.rows == 4  # three requests: a bucket of four rows
    for c in caches:
        c.release()


def test_a_backend_with_a_row_limit_caps_max_batch(engine_dir, monkeypatch):
    """A TensorRT engine takes the rows its decode profile allows (``Backend.max_rows``): the default max_batch is
    capped there and a larger one is refused with one line naming the way out (shown here on ort, whose backend
    declares no limit, given one)."""
    from runtime import InputError
    from runtime.backends.ort import OrtBackend

    monkeypatch.setattr(OrtBackend, "max_rows", 2, raising=False)
    assert Reasoner.load(engine_dir, backend="ort", reuse_mb=0).max_batch == 2
    with pytest.raises(InputError, match=r"max_batch=4 is more than this export's TensorRT decode profile takes \(2 "
                                         r"rows\).*--max-batch 4"):
        Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)


def test_apart_returns_and_raises_on_the_callers_thread():
    from runtime.engine import apart

    ran = []
    assert apart(lambda: ran.append(threading.current_thread()) or 7) == 7
    assert ran[0] is not threading.current_thread() and not ran[0].is_alive()
    with pytest.raises(KeyError, match="gone"):
        apart(lambda: {}["gone"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts a process's OS threads through Linux's /proc; needs 2 cores for an OpenMP worker")
def test_loading_leaves_no_pytorch_cpu_threads_behind(engine_dir):
    """``Reasoner.load`` runs PyTorch's parallel CPU kernels on a thread that ends with it (``runtime.engine.apart``):
    a fresh process holds as many OS threads after a torch-backend load as before it. The same load's work on the
    caller's thread (``Reasoner._open``) leaves OpenMP workers behind, which shows the count can tell."""
    code = (
        "import os, sys, time\n"
        "from runtime.reasoner import Reasoner\n"
        "count = lambda: len(os.listdir('/proc/self/task'))\n"
        "args = dict(backend='torch', reuse_mb=0, verify=False, max_batch=4, kv_mb=64)\n"
        "before = count()\n"
        "Reasoner.load(sys.argv[1], **args)\n"
        "end = time.monotonic() + 10\n"  # (threads that have ended leave /proc/self/task a moment later)
        "while count() > before and time.monotonic() < end:\n"
        "    time.sleep(0.05)\n"
        "after = count()\n"
        "Reasoner._open(sys.argv[1], args['backend'], None, None, False, 'auto', None, False, None, 0, 'auto', 4, 64)\n"
        "print(before, after, count())\n")
    out = subprocess.run([sys.executable, "-c", code, str(engine_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, on_caller = map(int, out.stdout.split()[-3:])
    assert after == before
    assert on_caller > after


def test_a_request_runs_with_the_threads_it_was_submitted_with():
    """``Engine.submit(threads=)``: the PyTorch threads a request's work runs with on the engine's thread (the ort
    backend's requests take one: its thread then keeps no OpenMP workers); 0, the submitting thread's setting."""
    import torch

    from runtime.engine import Engine

    engine = Engine("threads")

    def run(queue_s, running):
        yield torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert list(engine.submit(run, threads=1)) == [1]
        assert list(engine.submit(run)) == [2]
    finally:
        torch.set_num_threads(before)
