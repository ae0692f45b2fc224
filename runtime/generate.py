"""The decode loop: prefill, then one token at a time over the preallocated cache.

The trunk runs on the backend, the head (last layer + LM head) in PyTorch on the same device. Entropy is
computed where the logits live; the only host sync per token is the sampled id. A ``Steering`` object
(the V-Reason controller) can modulate the head's value cache, prune after prefill and replace a step's
logits; with none, this is the base method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from runtime.cache import KVCache
from runtime.engine import TICK, Call, drain
from runtime.sampling import SamplingParams, entropy, sample


@dataclass
class DecodeState:
    """What a step knows; the controller reads and updates it."""

    head: torch.nn.Module
    cache: KVCache
    video_index: torch.Tensor  # cache indices of visual tokens (before any pruning)
    hidden: torch.Tensor | None = None  # [1, 1, H] trunk output of the current query token
    positions: torch.Tensor | None = None  # [3, 1, 1] its rotary position
    step: int = 0
    deepstack: torch.Tensor | None = None  # prefill's DeepStack features [K, 1, S, H] (families that have them)

    @property
    def head_layer(self) -> int:
        return self.cache.layers - 1


class Steering(Protocol):
    def head_values(self, state: DecodeState, values: torch.Tensor) -> torch.Tensor:
        """The last layer's past values [1, P, kv, hd] as the head should see them."""

    def after_prefill(self, state: DecodeState) -> None:
        """Called once after prefill (Lite pruning goes here)."""

    def step(self, state: DecodeState, logits: torch.Tensor, recompute) -> tuple[torch.Tensor, float]:
        """Possibly update, then return the logits to sample from and alpha (0: no update). ``recompute(state,
        logits=None)`` runs the head again for the current token; given the token's logits as computed over the
        cache as it is, a recompute with autograd on runs the last layer only (``Loop.head_step``)."""

    def scheduled(self, step: int) -> bool:
        """Whether an update is due at step ``step``."""

    @property
    def period(self) -> int:
        """Updates fall on the steps that are multiples of this (0: none will); known after ``after_prefill``."""

    @staticmethod
    def update_rows(calls: list[tuple]) -> list[float]:
        """``step``'s update for several requests at once (``calls``: (steering, state, logits, recompute)), their
        alphas; the caller then recomputes each token's logits and calls ``record``."""

    def record(self, logits: torch.Tensor, alpha: float) -> None:
        """``step``'s end: the logits sampled from and the step's alpha (0.0: no update)."""

    def needs_graph(self, step: int) -> bool:
        """Whether step ``step``'s logits should be computed with autograd on (its update reuses them)."""


@dataclass
class Timings:
    prepare_s: float = 0.0  # decoding, resizing and patching the visual input, building the prompt
    queue_s: float = 0.0  # waiting for the engine's thread (runtime.engine)
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    ttft_s: float = 0.0  # request start (the ``stream``/``ask`` call) to the first answer token
    batch_mean: float = 1.0  # requests running, on average, when the engine advanced this one
    align_s: float = 0.0  # after prefill, waiting for the round on which the running requests' updates fall
    reused_prompt_tokens: int = 0  # prompt tokens whose cache was restored instead of prefilled
    reused_vision_patches: int = 0  # temporal patches not encoded: features from the reuse store, or (all of
    # them) every visual token inside the restored prompt prefix

    def as_dict(self) -> dict:
        tps = self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0
        return {"prepare_s": self.prepare_s, "queue_s": self.queue_s, "vision_s": self.vision_s,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_tokens_per_s": tps,
                "ttft_s": self.ttft_s, "batch_mean": self.batch_mean, "align_s": self.align_s,
                "reused_prompt_tokens": self.reused_prompt_tokens,
                "reused_vision_patches": self.reused_vision_patches}


@contextmanager
def torch_threads(n: int):
    """PyTorch's intra-op threads set to ``n`` for the block, then restored (0: left as they are). The loops
    enter it only around their own work, never across a ``yield``: the caller's code between tokens runs with
    its own setting."""
    before = torch.get_num_threads()
    if not n or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Cancelled(Exception):
    """A request stopped by ``Stream.cancel`` before its first token."""


@dataclass
class Token:
    id: int
    entropy: torch.Tensor | float  # 0-dim, on the logits' device (read it after the loop, not per token), or a float
    alpha: float = 0.0


@dataclass
class Loop:
    backend: object
    head: torch.nn.Module
    steering: Steering | None = None
    timings: Timings = field(default_factory=Timings)
    prefill_chunk: int = 0  # prefill at most this many tokens per trunk call (0: the whole prompt in one)
    cancelled: Callable[[], bool] | None = None  # checked between prefill chunks
    after_fill: Callable[[KVCache, torch.Tensor], None] | None = None  # (cache, last hidden) right after prefill
    restored_hidden: torch.Tensor | None = None  # the whole prompt's cache was restored: its last token's trunk output
    batched: bool = False  # decode steps are handed to the engine (``Call``s) to run with other requests' steps
    in_phase: Callable[[int], bool] | None = None  # the engine's ``Running.in_phase`` (batched: updates aligned)
    prefill_left: Callable[[int | None], None] | None = None  # told the prompt tokens left after each chunk; None: done

    @property
    def head_graph(self):
        """The backend's head as a graph of its own (``base_head``: ONNX Runtime on CPU), or None."""
        return self.backend.base_head

    def head_step(self, state: DecodeState, hidden: torch.Tensor, positions: torch.Tensor,
                  write: bool = True, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Last layer + LM head for ``hidden`` [1,S,H]; appends this layer's new entries unless ``write`` is off
        (a recompute of a token already cached). Returns the last position's logits [V]. A backend that carries
        the head as its own graph (``base_head``: ONNX Runtime on CPU) runs it wherever nothing differentiable
        is asked for: without a controller, and on a controller's steps without autograd where it reads the
        cached values as they are (V-Reason between updates: the cache already holds its injected values).
        ``logits``: this token's logits as already computed over the cache as it is; a differentiable
        recompute then runs the last layer only and takes them as the LM head's output (see ``Head.forward``)."""
        cache, layer = state.cache, state.head_layer
        length = cache.length if write else cache.length - hidden.shape[1]
        keys = cache.keys[layer][:, :length]
        cached = cache.values[layer][:, :length]
        values = cached if self.steering is None else self.steering.head_values(state, cached)
        graph = self.head_graph
        if graph is not None and values is cached and not torch.is_grad_enabled():
            return graph(hidden, positions, cache, layer, write)
        logits, k, v = self.head(hidden, positions, keys, values, last_only=True, logits=logits)
        if write:
            nk, nv = cache.slot(layer, hidden.shape[1])
            nk.copy_(k.detach())
            nv.copy_(v.detach())
        return logits[0, -1]

    def prefill(self, state: DecodeState, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Trunk and head over the prompt (fills every layer's cache), the first answer token's logits [V],
        then the steering's after-prefill hook (Lite pruning: the first logits come from the unpruned
        prefill). Leaves the last prompt token as the current query in ``state``. All at once: ``prefill_chunks``
        is the same, a chunk at a time."""
        return drain(self.prefill_chunks(state, embeds, positions))

    def prefill_chunks(self, state: DecodeState, embeds: torch.Tensor, positions: torch.Tensor
                       ) -> Generator[None, None, torch.Tensor]:
        """``prefill`` as a generator: yields ``TICK`` after each chunk of ``prefill_chunk`` tokens but the last
        (where the engine may advance other requests), returns the logits. No context (grad mode, threads) is
        held across a yield."""
        t0 = time.perf_counter()
        s = embeds.shape[1]
        step = self.prefill_chunk if 0 < self.prefill_chunk < s else max(s, 1)
        hidden = self.restored_hidden  # a prompt restored whole (s = 0; ``positions`` is its last token's)
        spent = 0.0
        for a in range(0, s, step):  # a cache that already holds a restored prefix: the suffix only
            if a:
                spent += time.perf_counter() - t0
                yield TICK
                t0 = time.perf_counter()
                if self.cancelled is not None and self.cancelled():
                    raise Cancelled
            b = min(a + step, s)
            with torch.no_grad():
                ds = None if state.deepstack is None else state.deepstack[:, :, a:b]
                hidden = self.backend.trunk(embeds[:, a:b], positions[:, :, a:b], state.cache, ds)
                self.head_step(state, hidden, positions[:, :, a:b])  # fills the last layer's cache
                state.cache.length += b - a
            if self.prefill_left is not None:
                self.prefill_left(s - b)
        with torch.no_grad():
            state.deepstack = None  # prefill only: decode tokens are never visual
            state.hidden, state.positions = hidden[:, -1:].clone(), positions[:, :, -1:].clone()
            if self.after_fill is not None:
                self.after_fill(state.cache, state.hidden)
            # computed exactly as a controller recompute computes them (one query over the cache), so that a
            # no-op update leaves every logit bit-identical
            logits = self._recompute(state)
        if self.steering is not None:
            self.steering.after_prefill(state)
        _sync(embeds.device)
        self.timings.prefill_s = spent + time.perf_counter() - t0
        if self.prefill_left is not None:
            self.prefill_left(None)
        return logits

    def threads(self):
        """The PyTorch thread setting for this loop's own work: the backend's ``torch_threads`` (ONNX Runtime on
        CPU asks for one, see ``OrtBackend``), else PyTorch's as it is."""
        return torch_threads(self.backend.torch_threads)

    def run(self, state: DecodeState, embeds: torch.Tensor, positions: torch.Tensor, next_position: int,
            max_new_tokens: int, params: SamplingParams, stop_ids: set[int]) -> Iterator[Token | Call | None]:
        """Prefill ``embeds`` [1,S,H] at ``positions`` [3,1,S], then generate; yields one Token per step, and
        ``TICK`` (None) between prefill chunks; with ``batched``, each step's ``Call``s too (whoever iterates
        sends back their results: the engine, or ``runtime.engine.alone``)."""
        dev = embeds.device
        gen = generator(params, dev)
        chunks = self.prefill_chunks(state, embeds, positions)
        while True:  # a TICK between prefill chunks: the engine may advance other requests there
            with self.threads():
                try:
                    next(chunks)
                except StopIteration as done:
                    logits = done.value
                    break
            yield TICK
        if self.batched and self.steering is not None and self.in_phase is not None:
            # the first step waits (a round at a time, at most period - 1) for the rounds on which the other running
            # requests' updates fall, so that updates run together rather than one call on every round
            t_wait = time.perf_counter()
            while not self.in_phase(self.steering.period):
                yield TICK
                self.timings.align_s = time.perf_counter() - t_wait
        t0 = time.perf_counter()
        try:
            for k in range(max_new_tokens):
                state.step = k
                alpha = 0.0
                if self.steering is not None:
                    logits, alpha = yield from self._steer(state, logits)
                h, token = self.pick(logits, params, gen)
                self.timings.decode_tokens = k + 1
                yield Token(token, h, alpha)
                if token in stop_ids or k + 1 == max_new_tokens:
                    break
                logits = yield from self._advance(state, token, next_position + k, k, dev)
        finally:
            _sync(dev)
            self.timings.decode_s = time.perf_counter() - t0

    def _steer(self, state: DecodeState, logits: torch.Tensor) -> Generator[Call, object, tuple[torch.Tensor, float]]:
        """The steering's step for the current token: (logits to sample from, alpha). With ``batched`` and the
        backend's ``head_rows``, the update and the recompute after it are yielded as ``Call``s (run with the other
        requests' updates and steps: one pass over the LM head for all of them)."""
        steering, rows = self.steering, self.backend.head_rows
        if not self.batched or rows is None:
            with self.threads():
                return steering.step(state, logits, self._recompute)
        alpha = 0.0
        if steering.scheduled(state.step):  # the update, with the other requests' due at this step; then this
            # token's logits again over the cache as the update left it, with theirs
            # (the logits copied: they may lie in a graph's output buffer, which other calls write before this one)
            alpha = yield Call(type(steering).update_rows, steering, state, logits.clone(), self._recompute)
            logits = yield Call(rows, state.hidden, state.positions, state.cache, False)
        with self.threads():
            steering.record(logits, alpha)
        return logits, alpha

    def pick(self, logits: torch.Tensor, params: SamplingParams, gen) -> tuple[torch.Tensor | float, int]:
        """The entropy of ``logits`` (a 0-dim tensor on their device, or a float where the backend's head graph
        computed it) and the token sampled from them (the one host sync per token). Where the head graph computed
        both with these very logits (``OrtHead.picked``), a greedy step takes them from it, without PyTorch."""
        graph = self.head_graph
        done = graph.picked(logits) if graph is not None else None
        if done is not None and params.temperature <= 0:
            return done
        with self.threads():
            return (entropy(logits) if done is None else done[0]), int(sample(logits, params, gen))

    def _advance(self, state: DecodeState, token: int, position: int, k: int, dev: torch.device
                 ) -> Generator[Call, object, torch.Tensor]:
        """Trunk and head for the token just sampled at step ``k``; returns its logits [V]. A generator: with
        ``batched``, the backend's ``decode_rows`` call, or its trunk call and then its head graph's call, are
        yielded as ``Call``s, which the engine runs together with the other running requests' (one pass over the
        weights for all); else it yields nothing."""
        decode = self.backend.decode_rows if self.batched else None
        if decode is not None:  # trunk and head in one call with the other requests', from the token's id
            hidden, logits = yield Call(decode, token, position, state.cache)
            state.cache.length += 1
            if self.steering is None:  # (read by a controller's updates and recomputes only)
                state.hidden = state.positions = None
            else:
                with self.threads(), torch.no_grad():
                    state.hidden = hidden.clone()  # (the call's output buffer is the next batched call's)
                    state.positions = torch.full((3, 1, 1), position, dtype=torch.long, device=dev)
            return logits
        with self.threads(), torch.no_grad():
            pos = torch.full((3, 1, 1), position, dtype=torch.long, device=dev)
            emb = self.head.embed(torch.tensor([[token]], device=dev))
            if not self.batched:
                hidden = self.backend.trunk(emb, pos, state.cache)
        if self.batched:  # (a copy: the call's output buffer is the next batched call's)
            hidden = (yield Call(self.backend.trunk_rows, emb, pos, state.cache)).clone()
        rows = self.backend.head_rows if self.batched else None
        if rows is not None:  # the rows' heads in one call, over the caches as they are (an update at the next
            # step recomputes the last layer alone and takes these logits as its LM head's output: update_rows)
            logits = yield Call(rows, hidden, pos, state.cache)
        else:
            # an update at the next step backpropagates through this very forward of the head (one head pass
            # saved per update); the trunk's output stays outside the graph. A backend with the head as its own
            # graph runs that graph instead: the update then recomputes the last layer alone and takes these
            # logits as its LM head's output (``_recompute``), so the LM head's forward runs once, in the graph
            graph = self.steering is not None and self.steering.needs_graph(k + 1) and self.head_graph is None
            with self.threads(), torch.enable_grad() if graph else torch.no_grad():
                logits = self.head_step(state, hidden, pos)
        with torch.no_grad():
            state.cache.length += 1
            # (batched: ``hidden`` is this request's own copy already)
            state.hidden, state.positions = (hidden if self.batched else hidden.clone()), pos
        return logits

    def _recompute(self, state: DecodeState, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The current token's logits again (after the controller changed the head's values). ``logits``: the
        ones already computed over the cache as it is, for a differentiable recompute (see ``head_step``)."""
        return self.head_step(state, state.hidden, state.positions, write=False, logits=logits)


def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
