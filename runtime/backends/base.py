"""What a backend is: the typed protocol the decode loop, the engine and the Reasoner use, and the defaults a
backend declares against (``BackendBase``), in place of capability flags read with ``getattr``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from runtime.cache import KVCache


@runtime_checkable
class Backend(Protocol):
    """A backend runs the vision encoder and the decoder trunk (the head runs in PyTorch, ``Loop.head_step``)."""

    name: str  # "trt", "ort", "torch"
    device: torch.device
    dtype: torch.dtype
    head_major_layers: int  # how many of the first cache layers it reads and writes head-major (KVCache.allocate)
    suffix_prefill: bool  # it can prefill on top of a cache that already holds entries (reuse, chunked prefill)
    graphs_outlive_prefill: bool  # CUDA graphs captured on a cache stay valid after another request's prefill
    torch_threads: int  # PyTorch threads for a request's own work between its calls, on the engine's thread and in
    # the loop (0: the submitting thread's setting)
    base_head: object | None  # the head as a graph of its own, for steps without autograd (None: PyTorch's head)
    batch_rows: bool  # it decodes several requests' tokens in one call (``trunk_rows``; caches: rows of a KVPool)
    head_rows: object | None  # with batch_rows: the head for several requests' tokens in one call (None: per row)
    # with batch_rows: the trunk and the head for several requests' next tokens in one call, from their token ids:
    # calls (token, position, cache) -> each request's (hidden [1,1,H], logits [V]) (None: trunk_rows, then head_rows)
    decode_rows: object | None
    pool_min_rows: int  # with batch_rows: rows its calls always cover (``runtime.pool.KVPool``'s ``min_rows``)
    pool_head_major: bool  # with batch_rows: the pool's layout its batched calls read (``KVPool``'s ``head_major``)
    max_rows: int  # with batch_rows: the most rows one call takes (0: any; a TensorRT engine's decode profile)
    batch_static: bool  # with batch_rows: static decode runs requests together too (``static_rows``)

    def encode_vision(self, inputs: dict[str, torch.Tensor], tokens: int,
                      hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds [tokens, hidden], DeepStack features [K, tokens, hidden] or None) of one visual input; fresh
        tensors at every call."""

    def trunk(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              deepstack: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [1, S, H] of ``embeds`` at ``positions`` over ``cache`` (its first ``cache.length``
        entries), the S new entries written at ``cache.length`` in place; the caller advances the length."""

    def trunk_step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        """Static decode: one token over the whole fixed-capacity cache, its entry written at ``index``."""

    def static_rows(self, cuda_graphs: bool) -> None:
        """With ``batch_static``: make ``trunk_rows`` and ``head_rows`` static-shape calls (CUDA graphs where
        ``cuda_graphs``), for static decode of several requests together."""

    def trunk_rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        """With ``batch_rows``: one decode step of several requests, ``calls`` (embeds [1,1,H], positions [3,1,1],
        cache) with every cache a row of one ``runtime.pool.KVPool``; each request's hidden state [1,1,H]."""


class BackendBase:
    """The defaults of ``Backend``'s declarations; a backend states only where it differs."""

    name = "backend"
    head_major_layers = 0
    suffix_prefill = True
    graphs_outlive_prefill = True
    torch_threads = 0
    base_head = None
    batch_rows = False
    head_rows = None
    decode_rows = None
    pool_min_rows = 1
    pool_head_major = True
    max_rows = 0
    batch_static = False

    def trunk_rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        raise NotImplementedError(f"the {self.name} backend decodes one request per call (batch_rows is off)")

    def static_rows(self, cuda_graphs: bool) -> None:
        raise NotImplementedError(f"the {self.name} backend's static decode takes one request at a time")
