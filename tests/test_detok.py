"""Streaming detokenization: the same text as a batch decode, stop strings cut where they start, and a cost per
token that does not grow with the answer's length."""

from __future__ import annotations

import random
import time

import pytest

from models.prompt import Tokenizer
from runtime.detok import Detokenizer


@pytest.fixture(scope="module")
def tok(engine_dir):
    return Tokenizer(engine_dir)


def ids_of(tok, n, seed):
    rng = random.Random(seed)
    return [rng.randrange(tok._tok.get_vocab_size()) for _ in range(n)]


@pytest.mark.parametrize("seed", range(3))
def test_incremental_text_equals_the_batch_decode(tok, seed):
    ids = ids_of(tok, 500, seed)
    d = Detokenizer(tok, [])
    streamed = "".join(d.step(i) for i in ids)
    full = tok.decode(ids)
    assert full.startswith(streamed) and len(full) - len(streamed) <= 1  # at most a held-back partial character
    assert d.text(ids) == full


@pytest.mark.parametrize("at", [0, 37, 300])
def test_stop_strings_cut_where_they_start(tok, at):
    ids = ids_of(tok, 500, 7)
    full = tok.decode(ids)
    start = next(i for i in range(at, len(full)) if "\ufffd" not in full[i:i + 5])
    stop = full[start:start + 5]
    d = Detokenizer(tok, ["never there", stop])
    pieces = []
    for i in ids:
        pieces.append(d.step(i))
        if d.stopped:
            break
    assert d.stopped and d.text(ids) == full[: full.find(stop)]
    assert "".join(pieces).startswith(d.text(ids))


def test_cost_per_token_does_not_grow_with_the_answer(tok):
    """A complexity check, not a speed test: the old re-decode of every id at every token was ~10x slower per
    token at 4,000 tokens than at 400; an incremental decode costs the same per token (at most 2x allowed)."""
    def per_token(n):
        ids = ids_of(tok, n, n)
        best = float("inf")
        for _ in range(3):
            d = Detokenizer(tok, ["</answer>"])
            t0 = time.perf_counter()
            for i in ids:
                d.step(i)
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    assert per_token(4000) <= 2.0 * per_token(400)
