"""Streaming detokenization: the same text as a batch decode, stop strings cut where they start, and a cost per
token that does not grow with the answer's length."""

from __future__ import annotations

import random

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


class CountingTokenizer:
    """The tokenizer, counting the ids handed to a whole decode and the calls of the per-token decoder."""

    def __init__(self, tok):
        self.tok, self.decoded_ids, self.steps = tok, 0, 0

    def decode(self, ids, **kw):
        self.decoded_ids += len(ids)
        return self.tok.decode(ids, **kw)

    def decode_stream(self):
        step = self.tok.decode_stream()

        def counted(token_id):
            self.steps += 1
            return step(token_id)
        return counted


def test_work_per_token_does_not_grow_with_the_answer(tok):
    """The work done, not a timing: each step hands one id to the incremental decoder and never decodes the answer
    so far (the old re-decode of every id at every token was quadratic), and the stop search looks at no more than
    the stop string's length before the new piece; the one whole decode is the final text's."""
    ids = ids_of(tok, 4000, 4000)
    counting = CountingTokenizer(tok)
    d = Detokenizer(counting, ["</answer>"])
    widest = 0
    for n, i in enumerate(ids, 1):
        d.step(i)
        widest = max(widest, len(d.tail))
        assert counting.decoded_ids == 0 and counting.steps == n
    assert widest <= len("</answer>") - 1
    assert d.text(ids) == tok.decode(ids) and counting.decoded_ids == len(ids)
