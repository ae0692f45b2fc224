"""The ort backend's batched decode step in one call (``OrtBackend.decode_rows``: the fused trunk and the head graph
from the tokens' ids, inputs written through numpy) against the two calls it stands for (the embedding, then
``trunk_rows``, then ``head_rows``): the same hidden states, logits, picks and cache entries, bit for bit."""

import pytest
import torch

from models.quantized import QuantEmbedding
from runtime.backends.ort import table_rows
from runtime.reasoner import Reasoner


def _filled(pool, lengths: list[int], g: torch.Generator) -> list:
    caches = []
    for length in lengths:
        c = pool.acquire(length + 4)
        for t in (*c.keys, *c.values):
            t[:, :length] = torch.randn(t[:, :length].shape, generator=g)
        c.length = length
        caches.append(c)
    return caches


def _buffers(pool) -> list[torch.Tensor]:
    return [t.clone() for t in (*pool.keys, *pool.values)]


@pytest.mark.parametrize("fixture", ["engine_dir", "int4_engine", "q3_engine"])
def test_decode_rows_is_the_embedding_trunk_rows_and_head_rows(fixture, request):
    r = Reasoner.load(request.getfixturevalue(fixture), backend="ort", reuse_mb=0, max_batch=4)
    b, pool = r.backend, r.pool
    assert b.decode_rows is not None and b.trunk_form == "fused"
    caches = _filled(pool, [7, 3, 11, 5], torch.Generator().manual_seed(0))
    idle = caches.pop(1)  # a row without a call (a request prefilling, say)
    tokens, positions = [5, 17, 9], [c.length + 2 for c in caches]  # (M-RoPE: a decode token's position is its own)
    before = _buffers(pool)

    got = b.decode_rows(list(zip(tokens, positions, caches)))
    hidden = [h.clone() for h, _ in got]
    logits = [x.clone() for _, x in got]
    picks = [b.base_head.picked(x) for _, x in got]
    after = _buffers(pool)

    for t, saved in zip((*pool.keys, *pool.values), before):
        t.copy_(saved)
    with torch.no_grad():
        embeds = [r.head.embed(torch.tensor([[t]])) for t in tokens]
    pos = [torch.full((3, 1, 1), p, dtype=torch.long) for p in positions]
    hidden2 = [h.clone() for h in b.trunk_rows(list(zip(embeds, pos, caches)))]
    out2 = b.head_rows(list(zip(hidden2, pos, caches)))
    picks2 = [b.base_head.picked(x) for x in out2]
    logits2 = [x.clone() for x in out2]

    for a, c in zip(hidden, hidden2):
        assert torch.equal(a, c)
    for a, c in zip(logits, logits2):
        assert torch.equal(a, c)
    assert picks == picks2 and all(type(h) is float and type(t) is int for h, t in picks)
    rows = [c.row for c in caches]
    for a, c in zip(after, _buffers(pool)):  # every entry of the rows with a call; the idle row's up to its length
        assert torch.equal(a[rows], c[rows])
        assert torch.equal(a[idle.row, :, :idle.length], c[idle.row, :, :idle.length])
    for c in (*caches, idle):
        c.release()


def test_decode_rows_refuses_a_cache_that_is_full(engine_dir):
    r = Reasoner.load(engine_dir, backend="ort", reuse_mb=0, max_batch=4)
    c = r.pool.acquire(8)
    c.length = c.capacity
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        r.backend.decode_rows([(5, c.length, c)])
    c.release()


def test_table_rows_are_the_modules_own_numbers():
    g = torch.Generator().manual_seed(1)
    ids = [3, 0, 41, 3, 17]
    dense = torch.nn.Embedding(50, 24)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(50, 24, generator=g))
        want = dense(torch.tensor(ids))
    assert torch.equal(torch.from_numpy(table_rows(dense)(ids)), want)
    # a table stored column-major (the LM head's layout, when the embedding shares its weight)
    dense.weight = torch.nn.Parameter(dense.weight.detach().t().contiguous().t(), requires_grad=False)
    assert torch.equal(torch.from_numpy(table_rows(dense)(ids)), want)
    quant = QuantEmbedding(**QuantEmbedding.quantize(torch.randn(50, 24, generator=g)))
    assert torch.equal(torch.from_numpy(table_rows(quant)(ids)), quant(torch.tensor(ids)))
    other = torch.nn.Sequential(torch.nn.Embedding(50, 24), torch.nn.LayerNorm(24))  # called as it is
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(table_rows(other)(ids)), other(torch.tensor(ids)))
