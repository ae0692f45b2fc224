"""Static-shape decode: no Python number that changes per token enters a step, so a step can be replayed.

The KV cache keeps its fixed capacity; the current cache index and rotary position are device tensors; each
layer writes its new entries at the device index (``index_copy_``) and attends over the whole buffer,
masked to the entries at or before it. V-Reason decides alpha on the device (``VReason.update_on_device``)
and guards its optimizer step there. The sampled ids, entropies and alphas go into device buffers that
the host reads once per ``chunk`` tokens (ids) and once per answer (traces).

On CUDA (``cuda_graphs``) each kind of step is run eagerly ``warmup`` times on a side stream, then
captured once as a CUDA graph and replayed for the rest of the answer:
  plain:  embed -> trunk -> head -> entropy [-> greedy pick]
  update: embed -> trunk -> head with autograd -> switching loss -> backward -> Adam (capturable)
          -> norm-preserving injection into the cache -> head again -> entropy [-> greedy pick]
Non-greedy sampling runs eagerly after the replay (one small kernel chain). The first answer token is
always eager (its query is the last prompt token, computed by the prefill).

Prefill stays dynamic (one call per request). The trunk step is the backend's ``trunk_step``: the PyTorch
modules (``Trunk.step``: entries written in place), or the exported trunk graph called with the whole
fixed-capacity cache as its past and ``cache_length`` = the device index (ONNX Runtime, TensorRT: new
entries land in staging buffers and are copied into the cache at that index on the device).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from runtime.generate import DecodeState, Loop, Token, _sync, generator
from runtime.sampling import SamplingParams, entropy, sample


@dataclass
class StaticLoop(Loop):
    cuda_graphs: bool = False
    chunk: int = 8  # tokens decoded between host reads of the sampled ids (1: every token, for streaming)
    warmup: int = 1  # eager runs of each kind of step before it is captured
    compile: bool = False  # torch.compile the trunk step (CUDA; compiled once per process and shape)
    sessions: dict | None = None  # kept by the caller across requests: buffers and graphs of the last shape

    def run(self, state: DecodeState, embeds: torch.Tensor, positions: torch.Tensor, next_position: int,
            max_new_tokens: int, params: SamplingParams, stop_ids: set[int]) -> Iterator[Token]:
        dev = embeds.device
        gen = generator(params, dev)
        with self.threads():
            first = self.prefill(state, embeds, positions)
        t0 = time.perf_counter()
        greedy = params.temperature <= 0
        key = (id(state.cache), max_new_tokens, greedy, self.compile, _steering_key(self.steering))
        # a backend whose captured work may not outlive the next prefill (TensorRT switches its optimization
        # profile for prefill) captures again for every answer
        keep = self.sessions is not None and self.backend.graphs_outlive_prefill
        held = self.sessions.get("static") if keep else None
        if held is not None and held[0] == key:
            # same shapes as the last request: its buffers, captured graphs and controller tensors, refilled
            _, steps, graphs = held
            if steps.steer is not None:
                steps.steer.reuse_for(self.steering)
                self.steering = steps.steer
            steps.reset(state, first, next_position)
        else:
            if self.steering is not None:
                self.steering.start_on_device()
            steps = _Steps(self, state, first, next_position, max_new_tokens, greedy)
            graphs = _Graphs(self.warmup) if self.cuda_graphs and dev.type == "cuda" else None
            if keep:
                self.sessions["static"] = (key, steps, graphs)
        steer = self.steering
        capture_before = graphs.capture_s if graphs is not None else 0.0
        n, k = max_new_tokens, 0
        try:
            while k < n:
                start, end = k, min(k + max(self.chunk, 1), n)
                with self.threads():
                    for k in range(start, end):
                        state.step = k
                        update = steer is not None and steer.scheduled(k)
                        if k == 0:
                            steps.update(first) if update else steps.first(first)
                        elif graphs is not None:
                            graphs.run("update" if update else "plain",
                                       steps.update_step if update else steps.plain_step)
                        else:
                            (steps.update_step if update else steps.plain_step)()
                        if not steps.greedy:
                            steps.pick(sample(steps.logits, params, gen))
                k = end
                for j, tok in enumerate(steps.ids[start:end].tolist()):  # the one host sync per chunk
                    self.timings.decode_tokens = start + j + 1
                    yield Token(tok, steps.entropy[start + j], steps.alpha[start + j])
                    if tok in stop_ids:
                        return
        finally:
            _sync(dev)
            self.timings.decode_s = time.perf_counter() - t0
            self.capture_s = (graphs.capture_s if graphs is not None else 0.0) - capture_before


class _Steps:
    """The device buffers of one answer and the step bodies that read and write only them."""

    def __init__(self, loop: StaticLoop, state: DecodeState, first: torch.Tensor, next_position: int, n: int,
                 greedy: bool) -> None:
        cache, dev = state.cache, first.device
        self.state, self.head, self.steer, self.greedy = state, loop.head, loop.steering, greedy
        self.backend, self.cache = loop.backend, cache
        if loop.compile and dev.type == "cuda" and hasattr(loop.backend, "compile_step"):
            loop.backend.compile_step()
        layer = state.head_layer
        self.head_keys, self.head_values = cache.keys[layer], cache.values[layer]
        self.index = torch.zeros(1, dtype=torch.long, device=dev)  # cache index of the current query token
        self.qpos = torch.zeros((3, 1, 1), dtype=torch.long, device=dev)  # its rotary position
        self.npos = torch.zeros((3, 1, 1), dtype=torch.long, device=dev)  # position of the last sampled token
        self.hidden = torch.empty_like(state.hidden)  # [1, 1, H] trunk output of the current query
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.logits = torch.empty_like(first)  # [V] the logits sampled from
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.entropy = torch.zeros(n, dtype=entropy(first).dtype, device=dev)
        self.alpha = torch.zeros(n, dtype=torch.float64, device=dev)
        self.k = torch.zeros(1, dtype=torch.long, device=dev)
        self.values_fn = None if self.steer is None else partial(self.steer.head_values, state)
        self.reset(state, first, next_position)

    def reset(self, state: DecodeState, first: torch.Tensor, next_position: int) -> None:
        """Fill the buffers for a new answer (in place: captured graphs keep reading the same memory)."""
        self.state = state
        self.index.fill_(state.cache.length - 1)
        self.qpos.copy_(state.positions)
        self.npos.fill_(next_position - 1)
        self.hidden.copy_(state.hidden)
        for t in (self.token, self.ids, self.entropy, self.alpha, self.k):
            t.zero_()

    # -- bodies: device work only, no host sync ------------------------------------------------------------------

    def advance(self) -> None:
        """The sampled token becomes the current query: embed, trunk (writes its entries), one position on."""
        self.index.add_(1)
        self.npos.add_(1)
        self.qpos.copy_(self.npos)
        with torch.no_grad():
            self.hidden.copy_(self.backend.trunk_step(self.head.embed(self.token), self.qpos, self.cache, self.index))

    def forward(self) -> torch.Tensor:
        """The head for the current query (differentiable in dV when grad is on): logits [V]."""
        return self.head.step(self.hidden, self.qpos, self.head_keys, self.head_values, self.index, self.values_fn)

    def first(self, logits: torch.Tensor) -> None:
        self._emit(logits, entropy(logits), None)

    def plain_step(self) -> None:
        self.advance()
        with torch.no_grad():
            logits = self.forward()
            self._emit(logits, entropy(logits), None)

    def update(self, before: torch.Tensor | None = None) -> None:
        logits, h, alpha = self.steer.update_on_device(self.state, self.forward, before)
        with torch.no_grad():
            self._emit(logits, h, alpha, recorded=True)

    def update_step(self) -> None:
        self.advance()
        self.update()

    def _emit(self, logits, h, alpha, recorded: bool = False) -> None:
        if self.steer is not None and not recorded:
            self.steer.record_on_device(h)
        self.logits.copy_(logits)
        self.entropy.index_copy_(0, self.k, h.view(1).to(self.entropy.dtype))
        if alpha is not None:
            self.alpha.index_copy_(0, self.k, alpha.view(1).double())
        if self.greedy:
            self.pick(logits.argmax(-1))

    def pick(self, token: torch.Tensor) -> None:
        self.token.copy_(token.view(1, 1))
        self.ids.index_copy_(0, self.k, token.view(1))
        self.k.add_(1)


class _Graphs:
    """Each kind of step: ``warmup`` eager runs on a side stream, then captured once and replayed."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.calls: Counter = Counter()
        self.capture_s = 0.0

    def run(self, kind: str, body) -> None:
        graph = self.graphs.get(kind)
        if graph is not None:
            graph.replay()
            return
        self.calls[kind] += 1
        main = torch.cuda.current_stream()
        if self.calls[kind] <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                body()
            main.wait_stream(side)
            return
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records, runs nothing
            body()
        self.capture_s += time.perf_counter() - t0
        self.graphs[kind] = graph
        graph.replay()


class RowGraphs:
    """Static decode of several requests together (the torch backend's batched calls, ``TorchBackend.static_rows``):
    each kind of call (``trunk``, ``head``) runs over the pool's whole buffers, every row at the whole capacity, its
    inputs copied into buffers of its own, so that its shapes and addresses stay while the pool's buffers do. On
    CUDA (``cuda_graphs``) each kind is warmed up, captured once and replayed as the static loop's steps are
    (``_Graphs``). The pool's shape is the batch-size bucket: its rows are rounded up to a power of two
    (``KVPool(row_buckets=True)``), so requests joining and leaving replay the same graphs, captured again only when
    the pool grows past its bucket (more rows, or a longer capacity: new buffers, new inputs' shapes), which drops
    the graphs of the old buffers. The output is the same buffer at every replay: read it before the next call of
    its kind."""

    def __init__(self, cuda_graphs: bool, warmup: int = 1) -> None:
        self.cuda_graphs, self.warmup = cuda_graphs, warmup
        self.generation: int | None = None  # the pool buffers' generation the entries and graphs are made on
        self.entries: dict[str, dict] = {}  # per kind: its input buffers, and its output as last written
        self.graphs: _Graphs | None = None
        self.dropped = 0  # graphs captured on earlier buffers

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self.dropped + (len(self.graphs.graphs) if self.graphs is not None else 0)

    def run(self, kind: str, pool, inputs: tuple[torch.Tensor, ...], body) -> torch.Tensor:
        if pool.generation != self.generation:  # new buffers: what was made on the old ones is stale
            self.dropped = self.captures
            self.entries.clear()
            self.graphs = _Graphs(self.warmup) if self.cuda_graphs else None
            self.generation = pool.generation
        e = self.entries.get(kind)
        if e is None:
            e = self.entries[kind] = {"inputs": [t.clone() for t in inputs], "out": None}
        for b, t in zip(e["inputs"], inputs):
            b.copy_(t)
        if self.graphs is None:
            return body(*e["inputs"])

        def step() -> None:  # eager and while captured; a replay rewrites the output captured
            e["out"] = body(*e["inputs"])

        self.graphs.run(kind, step)
        return e["out"]


def static_capacity(needed: int, limit: int | None = None) -> int:
    """Cache capacity for static decode: ``needed`` rounded up to a multiple of 256 (so that requests of
    similar size share one cache and its captured graphs), but not past ``limit`` (the export's context)."""
    rounded = -(-needed // 256) * 256
    return max(needed, min(rounded, limit)) if limit is not None else rounded


def _steering_key(steer) -> tuple:
    """What a captured update depends on besides the cache: the controller's settings (captured as constants)
    and the shapes of its tensors."""
    if steer is None:
        return ()
    return (type(steer).__name__, tuple(sorted(steer.config_dict().items())), tuple(steer.delta.shape),
            str(steer.delta.device))
