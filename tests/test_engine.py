"""The engine: requests from many threads on one Reasoner. A consumer that pauses, keeps an unfinished stream,
abandons or cancels it delays no other request and deadlocks nothing; nested requests work; every finished
answer equals the same request run alone."""

from __future__ import annotations

import random
import threading

import pytest

from runtime.reasoner import Reasoner

QUESTIONS = ["Which shape moves left?", "What color is the circle?", "How many squares?", "Which way?"]
TIMEOUT = 120  # seconds: far above what these requests take; reached only if something hangs


@pytest.fixture(scope="module")
def reasoner(engine_dir):
    return Reasoner.load(engine_dir, backend="ort", reuse_mb=0)


@pytest.fixture(scope="module")
def solo(reasoner):
    """Each question's answer, asked alone."""
    return {q: reasoner.ask(question=q, max_new_tokens=10).token_ids for q in QUESTIONS}


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


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
                t, box = _in_thread(b)
                if not answered.wait(TIMEOUT):  # the pause: until B has its answer
                    raise AssertionError("B was not answered while A paused in its stream")
                t.join()
                assert box["value"] == solo[QUESTIONS[1]]
        return ids

    t, box = _in_thread(a)
    t.join(TIMEOUT + 10)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert box["value"] == solo[QUESTIONS[0]]  # A's answer, whole, after its pause


def test_a_kept_unfinished_stream_and_a_request_from_another_thread_do_not_deadlock(reasoner, solo):
    """Thread A keeps an unfinished stream, thread B makes a request, then A asks again: each is answered (before,
    A's second request blocked forever: the one slot that tracked unfinished streams had been taken by B's)."""
    held = reasoner.stream(question=QUESTIONS[0], max_new_tokens=10)
    it = iter(held)
    next(it)  # A keeps it unfinished
    t, box = _in_thread(lambda: reasoner.ask(question=QUESTIONS[1], max_new_tokens=10).token_ids)
    t.join(TIMEOUT)
    assert not t.is_alive() and box.get("value") == solo[QUESTIONS[1]]
    t, box = _in_thread(lambda: reasoner.ask(question=QUESTIONS[2], max_new_tokens=10).token_ids)  # A again
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
