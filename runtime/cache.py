"""The KV cache: one preallocated token-major buffer per layer and kind, sized once per request.

Buffers are [1, capacity, kv_heads, head_dim]. A step's new entries are one contiguous block at offset
``length``, so backends write them straight into place (ORT IO binding, TensorRT tensor addresses) and
nothing is copied or reallocated while an answer is generated. The cache length is independent of the
rotary position (Lite pruning shortens the cache; positions continue from the original sequence).

A backend whose attention reads another layout asks for its layers head-major (``head_major``: ONNX
Runtime's GroupQueryAttention, in the ort backend's fused trunk on CPU): those layers are stored as
[1, kv_heads, capacity, head_dim] buffers, each head's entries one run, and ``keys``/``values`` hold
[1, capacity, kv_heads, head_dim] views of them, so everything else (the head, V-Reason, Lite, prefix reuse)
reads and writes them as it reads the token-major ones; ``storage`` gives the buffer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [1, capacity, kv_heads, head_dim]
    values: list[torch.Tensor]
    length: int = 0
    pool = None  # a cache that is a row of a ``runtime.pool.KVPool``: that pool (``row``: its row)

    @classmethod
    def allocate(cls, layers: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, head_major: int = 0) -> KVCache:
        """``head_major``: how many of the first layers are stored head-major (see the module docstring)."""

        def buffer(layer: int) -> torch.Tensor:
            if layer < head_major:
                return torch.zeros(1, kv_heads, capacity, head_dim, dtype=dtype, device=device).transpose(1, 2)
            return torch.zeros(1, capacity, kv_heads, head_dim, dtype=dtype, device=device)

        return cls([buffer(i) for i in range(layers)], [buffer(i) for i in range(layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def layers(self) -> int:
        return len(self.keys)

    def storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head-major buffers [1, kv, capacity, hd] of ``layer`` (keys, values); ValueError for a layer
        stored token-major."""
        k, v = self.keys[layer].transpose(1, 2), self.values[layer].transpose(1, 2)
        if not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"layer {layer} of the KV cache is not stored head-major; allocate the cache with "
                             "the backend's head_major_layers")
        return k, v

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [1, length, kv, hd] of what is cached (no copy)."""
        return self.keys[layer][:, : self.length], self.values[layer][:, : self.length]

    def slot(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [1, n, kv, hd] where the next n entries go (no copy)."""
        end = self.room(n)
        return self.keys[layer][:, self.length : end], self.values[layer][:, self.length : end]

    def room(self, n: int) -> int:
        """The length after ``n`` more entries; raises where they do not fit (the overflow check alone, without
        ``slot``'s views: a batched decode step makes it once per request)."""
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        return end

    def release(self) -> None:
        """The request holding this cache has ended (a pooled cache gives its row back: ``runtime.pool``)."""

    def keep(self, index: torch.Tensor) -> None:
        """Compact every layer in place to the cached positions ``index`` (sorted, unique): used by Lite."""
        n = int(index.numel())
        for buf in (*self.keys, *self.values):
            kept = buf[:, : self.length].index_select(1, index)
            buf[:, :n].copy_(kept)
        self.length = n
