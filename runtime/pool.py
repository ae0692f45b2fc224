"""The KV caches of the requests an engine runs together, as rows of one buffer per layer and kind, so that one
graph call can decode all of them (``Backend.trunk_rows`` and ``head_rows``: ONNX Runtime's GroupQueryAttention
takes a batch of caches as one head-major [rows, kv, capacity, hd] tensor, each row with its own length; the
exported standard graph, on ONNX Runtime or TensorRT, one token-major [rows, capacity, kv, hd] tensor with each
row's length as ``cache_length``; ``head_major`` says which layout a pool holds, ``Backend.pool_head_major``).

A request takes a row (``acquire``) when its prefill starts and gives it back when it ends
(``PooledCache.release``); its ``KVCache`` is views of its row ([1, capacity, kv, hd], in either layout), so
everything that reads
or writes a cache (the backends' one-request calls, the head, V-Reason, Lite, prefix reuse) does so unchanged. The
buffers are made anew when a request needs a row or a capacity they do not have: as many rows as the requests
holding rows and the new one, at the longest capacity of theirs, their entries copied over and their views moved
(between units of work, on the engine's thread; nothing holds a view across one); they stay when the last request
leaves, for the next (``clear`` frees them). Each row has the buffers' capacity, so requests held together take
``held_bytes``: rows x the longest of their capacities (each rounded up to ``ROUND`` entries; a request alone holds
``min_rows`` rows), which is what the engine's KV budget counts them at: the buffers never outgrow what the budget
admitted together (a long request with short ones holds the long one's capacity in every row).
"""

from __future__ import annotations

import torch

from runtime.cache import KVCache

# capacities are rounded up to a multiple of this (fewer regrowths as requests come and go), and close to what the
# requests need: every row has the pool's capacity, and the KV budget counts each request at its own (with 256,
# requests of 196 prompt and 96 new tokens held x1.75 their own; with 64, x1.10)
ROUND = 64
BUCKET_ROUND = 256  # with ``row_buckets`` (static decode): fewer pool shapes, each one CUDA graph capture


class PooledCache(KVCache):
    """A request's cache: views of one row of a ``KVPool`` (``pool``, ``row``; ``need``: the capacity it asked for,
    rounded as the pool rounds it)."""

    row: int
    need: int

    def release(self) -> None:
        """Give the row back (the request has ended); the views are not to be used after."""
        self.pool.release(self)


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 min_rows: int = 1, head_major: bool = True, row_buckets: bool = False,
                 max_capacity: int | None = None) -> None:
        """``min_rows``: rows the buffers have at least (a backend whose kernels round one row differently from
        several asks for 2: a request alone is then decoded as one row of two, as it is with others;
        ``Backend.pool_min_rows``). ``head_major``: buffers [rows, kv, capacity, hd], else [rows, capacity, kv,
        hd]. ``row_buckets``: rows grow to a power of two and capacities to a multiple of ``BUCKET_ROUND`` (static
        decode: each pool shape is a batch-size bucket, whose CUDA graphs are captured once,
        ``runtime.static.RowGraphs``). ``max_capacity``: capacities are rounded
        up to ``ROUND`` but not past it (the export's context: a TensorRT decode profile's largest past)."""
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.min_rows, self.head_major, self.row_buckets = min_rows, head_major, row_buckets
        self.max_capacity = max_capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.keys: list[torch.Tensor] = []  # per layer [rows, kv, capacity, hd] (token-major: [rows, capacity, kv, hd])
        self.values: list[torch.Tensor] = []
        self.holders: list[PooledCache | None] = []  # the cache of each row (None: free)
        self.generation = 0  # moves on whenever the buffers are replaced (bindings made on them are stale)
        self.peak_bytes = 0  # the most the buffers have held (a benchmark resets it)

    @property
    def rows(self) -> int:
        return len(self.holders)

    @property
    def span(self) -> int:
        """The rows a batched call covers (dynamic decode; static decode covers them all, at fixed shapes): up to the
        last row a request holds, ``min_rows`` at least. The buffers stay as they grew after a burst of requests;
        a request alone after it is then decoded as the one row it holds (or the rows up to it), not as every
        row of the buffers (measured on the bench fp32 export, 2 cores, the fused trunk's step: 1 row 43.8 ms, 4
        rows 56.3 ms)."""
        last = max((i for i, h in enumerate(self.holders) if h is not None), default=-1)
        return min(self.rows, max(self.min_rows, last + 1))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2 if self.head_major else 1] if self.keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def rounded(self, capacity: int) -> int:
        """The capacity a row for a request of ``capacity`` entries has at least: rounded up to ``ROUND`` entries
        (``BUCKET_ROUND`` with ``row_buckets``), but not past ``max_capacity``."""
        step = BUCKET_ROUND if self.row_buckets else ROUND
        need = -(-capacity // step) * step
        return need if self.max_capacity is None else max(capacity, min(need, self.max_capacity))

    def rows_for(self, held: int) -> int:
        """The rows the buffers have when they are made for ``held`` requests."""
        rows = max(held, self.min_rows)
        return 1 << (rows - 1).bit_length() if self.row_buckets else rows

    def held_bytes(self, needs: list[int]) -> int:
        """The bytes the buffers hold at most for requests of these rounded capacities (``rounded``) held together:
        ``rows_for`` of them, each row at the longest capacity (what the engine's KV budget counts)."""
        per_entry = 2 * self.layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        return self.rows_for(len(needs)) * max(needs, default=0) * per_entry

    def acquire(self, capacity: int) -> PooledCache:
        """A row for a request of ``capacity`` entries, its cache empty (length 0). Where the buffers have no free
        row or too short a capacity, new ones are made for the requests holding rows and this one (``_grow``)."""
        need = self.rounded(capacity)
        row = next((i for i, h in enumerate(self.holders) if h is None), self.rows)
        if row >= self.rows or need > self.capacity:
            self._grow(need)
            row = self.holders.index(None)
        cache = PooledCache([], [])
        cache.pool, cache.row, cache.need = self, row, need
        self.holders[row] = cache
        self._view(cache)
        return cache

    def release(self, cache: PooledCache) -> None:
        """Give a request's row back. The buffers stay for the next requests, which take them as they are (freed,
        a server's traffic would free and allocate them again between requests; one 60 s soak run with that, on a
        loaded machine, saw the server's resident memory grow 5.3%, which a run alone did not repeat); ``clear``
        frees them."""
        if cache.row < self.rows and self.holders[cache.row] is cache:
            self.holders[cache.row] = None

    def clear(self) -> None:
        """Free the buffers if no request holds a row (after an out-of-memory error, say)."""
        if all(h is None for h in self.holders):
            self.keys, self.values, self.holders = [], [], []
            self.generation += 1

    def token_major(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values as [rows, capacity, kv, hd] (views, in either layout)."""
        k, v = self.keys[layer], self.values[layer]
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.head_major else (k, v)

    def lengths(self) -> list[int]:
        """Each row's cache length (0 for a free row)."""
        return [0 if h is None else h.length for h in self.holders]

    def _view(self, cache: PooledCache) -> None:
        r = cache.row
        views = [self.token_major(i) for i in range(self.layers)]
        cache.keys[:] = [k[r:r + 1] for k, _ in views]  # [1, capacity, kv, hd] views
        cache.values[:] = [v[r:r + 1] for _, v in views]

    def _grow(self, need: int) -> None:
        """New buffers for the requests holding rows and one more of capacity ``need``: as many rows as they take
        (``rows_for``), at the longest capacity of theirs, not of the buffers before (which may have grown for
        requests that have left since). The holders' entries are copied over, to rows 0, 1, ... in their order,
        and their views moved (between units of work, on the engine's thread: nothing holds a view across one). So
        the buffers hold what ``held_bytes`` counts for the requests they were made for, which the engine's KV
        budget admitted together."""
        held = [h for h in self.holders if h is not None]
        rows, capacity = self.rows_for(len(held) + 1), max([need, *(h.need for h in held)])
        shape = (rows, self.kv_heads, capacity, self.head_dim) if self.head_major else \
            (rows, capacity, self.kv_heads, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        n = min(self.capacity, capacity)  # (a holder's entries, written or not yet counted, lie within its need)
        for r, h in enumerate(held):
            for new, old in zip((*keys, *values), (*self.keys, *self.values)):
                if self.head_major:
                    new[r, :, :n].copy_(old[h.row, :, :n])
                else:
                    new[r, :n].copy_(old[h.row, :n])
            h.row = r
        self.keys, self.values = keys, values
        self.holders = held + [None] * (rows - len(held))
        self.generation += 1
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        for h in held:
            self._view(h)


def kept_for_rows(held: dict, pool: KVPool, n: int, make):
    """A batched call's binding over ``pool``'s first ``n`` rows, from ``held`` (one per row count, keyed by the
    pool's generation and ``n``), made by ``make()`` when missing; bindings on the pool's old buffers are dropped."""
    key = (pool.generation, n)
    t = held.get(key)
    if t is None:
        if any(k[0] != pool.generation for k in held):
            held.clear()
        t = held[key] = make()
    return t


def row_inputs(calls: list[tuple], dtype: torch.dtype, device, rows: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The inputs of a batched one-token call over every row of a pool (or its first ``rows``): ``calls`` are (x
    [1,1,W], positions [3,1,1], cache[, write]), every cache a row of one pool. Returns x [rows,1,W] (zeros for a
    row without a call), positions [3,rows,1], the index each row's entries go to [rows] (its length; with
    ``write`` off, a recompute of the token last cached: length - 1) and the end of what any row reads (the
    largest index + 1). A row without a call gets a zero token written at its length, where nothing is read and
    its own next write lands."""
    pool = calls[0][2].pool
    n = pool.rows if rows is None else rows
    width = calls[0][0].shape[-1]
    x = torch.zeros(n, 1, width, dtype=dtype, device=device)
    positions = torch.zeros(3, n, 1, dtype=torch.long, device=device)
    index = pool.lengths()[:n]
    for h, p, cache, *write in calls:
        if cache.pool is not pool or cache.row >= n:
            raise ValueError("a batched call takes rows of one KV pool (the rows it covers)")
        if not write or write[0]:
            cache.room(1)
        else:
            index[cache.row] = cache.length - 1
        x[cache.row] = h[0]
        positions[:, cache.row] = p[:, 0]
    return x, positions, torch.tensor(index, device=device), max(index) + 1


def run_rows(kind: str, calls: list[tuple], dtype: torch.dtype, device, fixed, body):
    """A batched one-token call of a PyTorch backend: ``body(x, positions, index, end)`` over the rows' inputs
    (``row_inputs``: the pool's first ``len(x)`` rows, ``span`` of them, each read up to ``end``). With ``fixed`` (a
    ``runtime.static.RowGraphs``, static decode) it runs through it at fixed shapes, every row of the pool and
    ``end`` its whole capacity (replayed as a CUDA graph on CUDA)."""
    pool = calls[0][2].pool
    x, positions, index, end = row_inputs(calls, dtype, device, rows=None if fixed is not None else pool.span)
    if fixed is None:
        return body(x, positions, index, end)
    whole = pool.capacity
    return fixed.run(kind, pool, (x, positions, index), lambda x_, p_, i_: body(x_, p_, i_, whole))


@torch.no_grad()
def head_rows(head, calls: list[tuple], dtype: torch.dtype, device, fixed=None) -> list[torch.Tensor]:
    """The PyTorch head for several requests' tokens in one pass (``Head.step_rows`` over the head layer of their
    pool, each row read to its own index; ``calls`` as ``row_inputs`` takes them): each request's logits [V]. The
    batched head of the backends whose head has no batched graph of its own (``Backend.head_rows``); ``fixed``: see
    ``run_rows``."""
    pool = calls[0][2].pool
    keys, values = pool.token_major(pool.layers - 1)
    logits = run_rows("head", calls, dtype, device, fixed,
                      lambda x, p, i, end: head.step_rows(x, p, keys[:len(x), :end], values[:len(x), :end], i))
    return [logits[call[2].row] for call in calls]
