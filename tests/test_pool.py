"""The KV pool (``runtime.pool``): requests' caches as rows of one buffer per layer, grown as requests join, their
entries kept and their views moved when it grows, kept for the next requests and freed by ``clear``."""

from __future__ import annotations

import pytest
import torch

from runtime.pool import BUCKET_ROUND, ROUND, KVPool, row_inputs


def fill(cache, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for t in (*cache.keys, *cache.values):
        t[:, :length] = torch.randn(t[:, :length].shape, generator=g)
    cache.length = length
    return [t[:, :length].clone() for t in (*cache.keys, *cache.values)]


def test_rows_grow_keep_their_entries_and_are_freed_on_clear():
    pool = KVPool(3, 2, 8, torch.float32, "cpu", min_rows=2)
    a = pool.acquire(10)
    assert (pool.rows, pool.capacity) == (2, ROUND) and a.row == 0 and a.length == 0
    assert a.capacity == ROUND and a.storage(2)[0].shape == (1, 2, ROUND, 8)  # head-major in every layer
    kept_a = fill(a, 7, seed=1)
    b = pool.acquire(ROUND + 1)  # a longer request: every row grows to its capacity
    assert (pool.rows, pool.capacity, b.row) == (2, 2 * ROUND, 1) and a.capacity == 2 * ROUND
    kept_b = fill(b, 5, seed=2)
    c = pool.acquire(3)  # a third row
    assert (pool.rows, c.row) == (3, 2)
    for cache, kept in ((a, kept_a), (b, kept_b)):  # the entries moved with the rows, the views with them
        assert all(torch.equal(t[:, :cache.length], k) for t, k in zip((*cache.keys, *cache.values), kept))
    assert pool.keys[0][0, :, :7].data_ptr() == a.keys[0].data_ptr()  # a's views are its row of the buffers
    assert pool.peak_bytes == pool.nbytes == 2 * 3 * 3 * 2 * 2 * ROUND * 8 * 4
    b.release()
    d = pool.acquire(4)  # a free row is taken again, the buffers as they are
    assert d.row == 1 and pool.rows == 3 and pool.lengths() == [7, 0, 0]
    a.release()
    pool.clear()  # a row is still held: nothing is freed
    assert pool.rows == 3 and pool.lengths() == [0, 0, 0]
    for cache in (c, d):
        cache.release()
    assert pool.rows == 3  # kept for the next requests
    pool.clear()
    assert pool.rows == 0 and pool.nbytes == 0 and pool.keys == []


def test_new_buffers_fit_the_requests_holding_rows_not_those_that_left():
    """Buffers made anew take as many rows as the requests holding rows and the new one, at the longest capacity of
    theirs: the holders' entries move to the first rows, and a long request that has left no longer sets every row's
    capacity. The buffers hold what ``held_bytes`` counts for the requests they were made for."""
    pool = KVPool(2, 1, 4, torch.float32, "cpu")
    a = pool.acquire(3 * ROUND)
    b = pool.acquire(10)
    kept = fill(b, 7, seed=3)
    assert (pool.rows, pool.capacity, b.row) == (2, 3 * ROUND, 1)
    a.release()
    c = pool.acquire(4 * ROUND)  # row 0 is free but too short: new buffers for b and c, b moved to the first row
    assert (pool.rows, pool.capacity, b.row, c.row) == (2, 4 * ROUND, 0, 1)
    assert all(torch.equal(t[:, :7], k) for t, k in zip((*b.keys, *b.values), kept))
    assert pool.nbytes == pool.held_bytes([b.need, c.need])
    c.release()
    d = pool.acquire(20)  # a free row, long enough: taken as it is
    assert (d.row, pool.capacity) == (1, 4 * ROUND)
    e = pool.acquire(30)  # no free row: three rows at the capacity of the three holding them, not the one gone
    assert (pool.rows, pool.capacity, [b.row, d.row, e.row]) == (3, ROUND, [0, 1, 2])
    assert all(torch.equal(t[:, :7], k) for t, k in zip((*b.keys, *b.values), kept))
    assert pool.nbytes == pool.held_bytes([b.need, d.need, e.need])
    assert pool.peak_bytes == 2 * 4 * ROUND * (2 * 2 * 4 * 4)  # rows x entries x (K and V, 2 layers, 4 floats)


def test_one_row_by_default():
    pool = KVPool(2, 1, 4, torch.float32, "cpu")
    pool.acquire(3)
    assert pool.rows == 1 and pool.capacity == ROUND


def test_a_token_major_pool_holds_each_row_contiguous_and_grows_the_same():
    """The layout the exported standard graph reads ([rows, capacity, kv, hd]: ort's standard form, TensorRT)."""
    pool = KVPool(2, 2, 4, torch.float32, "cpu", head_major=False)
    a = pool.acquire(10)
    kept = fill(a, 6, seed=3)
    assert pool.keys[0].shape == (1, ROUND, 2, 4) and a.keys[0].is_contiguous()
    assert a.keys[1].data_ptr() == pool.keys[1].data_ptr()
    b = pool.acquire(ROUND + 1)  # grows in rows and capacity
    assert pool.keys[0].shape == (2, 2 * ROUND, 2, 4) and b.row == 1 and a.keys[0].is_contiguous()
    assert all(torch.equal(t[:, :6], k) for t, k in zip((*a.keys, *a.values), kept))
    keys, values = pool.token_major(1)
    assert keys is pool.keys[1] and torch.equal(values[0, :6], a.values[1][0, :6])
    head_major = KVPool(2, 2, 4, torch.float32, "cpu")
    c = head_major.acquire(10)
    kept = fill(c, 6, seed=4)
    assert torch.equal(head_major.token_major(0)[0][0, :6], kept[0][0])  # the same view, whatever the layout


def test_capacities_round_up_but_not_past_the_limit():
    """A pool's capacity is rounded up to ROUND entries, but not past ``max_capacity`` (the export's context, which is
    a TensorRT decode profile's largest past)."""
    limit = 2 * ROUND + ROUND // 2
    pool = KVPool(2, 1, 4, torch.float32, "cpu", max_capacity=limit)
    pool.acquire(10)
    assert pool.capacity == ROUND
    pool.acquire(2 * ROUND + 1)
    assert pool.capacity == limit
    # static decode's pool (batch-size buckets): rows in powers of two, capacities in multiples of BUCKET_ROUND
    buckets = KVPool(2, 1, 4, torch.float32, "cpu", row_buckets=True)
    for _ in range(3):
        buckets.acquire(10)
    assert (buckets.rows, buckets.capacity) == (4, BUCKET_ROUND) and BUCKET_ROUND % ROUND == 0


def test_a_call_spans_the_rows_up_to_the_last_one_held():
    """``span``: the rows a batched call covers where it may cover fewer than all: up to the last held row, at
    least ``min_rows``; the buffers keep the rows they grew to."""
    pool = KVPool(2, 2, 8, torch.float32, "cpu")
    assert pool.span == 0  # no buffers yet
    caches = [pool.acquire(4) for _ in range(4)]
    assert (pool.rows, pool.span) == (4, 4)
    caches[3].release()
    caches[1].release()
    assert (pool.rows, pool.span) == (4, 3)  # row 2 is still held
    caches[2].release()
    assert (pool.rows, pool.span) == (4, 1)  # a request alone after the burst: its one row
    caches[0].release()
    assert pool.span == 1
    two = KVPool(2, 2, 8, torch.float32, "cpu", min_rows=2)
    two.acquire(4)
    assert (two.rows, two.span) == (2, 2)  # never under min_rows


def test_a_batched_call_refuses_a_row_whose_cache_is_full():
    """``row_inputs``' overflow check (``KVCache.room``): a row at its capacity cannot take another token, while a
    recompute of its last token (``write`` off) writes nothing new and goes through."""
    pool = KVPool(2, 2, 8, torch.float32, "cpu")
    a, b = pool.acquire(4), pool.acquire(4)
    a.length, b.length = 3, pool.capacity
    token, pos = torch.zeros(1, 1, 16), torch.zeros(3, 1, 1, dtype=torch.long)
    x, _, index, end = row_inputs([(token, pos, a), (token, pos, b, False)], torch.float32, "cpu")
    assert index.tolist() == [3, pool.capacity - 1] and end == pool.capacity and x.shape == (2, 1, 16)
    with pytest.raises(RuntimeError, match=f"KV cache overflow: {pool.capacity + 1} > capacity {pool.capacity}"):
        row_inputs([(token, pos, a), (token, pos, b)], torch.float32, "cpu")
    assert a.room(2) == 5 and b.room(0) == pool.capacity
