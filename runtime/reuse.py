"""Work kept across requests, content-addressed, in one LRU bounded in bytes (``Reasoner.load(reuse_mb=...)``).

Two kinds of entries:
- vision features of one temporal patch (two frames), keyed by a digest of the patch's preprocessed pixels (which
  covers the frames' content and every preprocessing setting: frame size, normalization), its grid and the
  export. Reused only for families whose encoder sees one temporal patch at a time (``FRAME_LOCAL_VISION``), so a
  reused patch is what encoding it again gives.
- the KV cache of a prompt's prefix (every layer, trunk and head) as the prefill produced it, before any
  controller touched it (V-Reason rewrites the head layer's video values while decoding, Lite compacts every
  layer): a saved copy. A later prompt that starts with the same tokens and has the same visual content restores
  the longest such prefix and prefills only its own suffix. The whole prompt is saved, with the trunk's output
  for its last token: the same prompt again restores everything and prefills nothing (its first answer token
  comes from exactly the cache and hidden state the first prefill made, so it is bit-identical); another
  question on the same clip reuses everything up to where the two prompts differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import cachetools
import numpy as np
import torch

from runtime.cache import KVCache

DEFAULT_FRACTION, DEFAULT_CAP_MB = 0.10, 2048


def default_reuse_mb(device: torch.device) -> int:
    """The default budget: a tenth of the device's free memory at load (CUDA: free GPU memory; CPU: available
    RAM), at most 2 GiB."""
    from models.checks import available_memory

    free = available_memory(device) or 0
    return int(min(DEFAULT_CAP_MB, free * DEFAULT_FRACTION / 2**20))


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Prefix:
    """The cache of a prompt's first ``len(ids)`` tokens as the prefill left it."""

    ids: np.ndarray  # int64 [n]
    visual_key: tuple  # digests of the prompt's visual inputs
    keys: list[torch.Tensor]  # per layer [1, n, kv, hd]
    values: list[torch.Tensor]
    hidden: torch.Tensor  # [1, 1, H] the trunk's output for the last token

    @property
    def nbytes(self) -> int:
        return nbytes(*self.keys, *self.values, self.hidden)


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes the tensors really keep alive: each distinct storage whole (a view keeps all of its base)."""
    seen = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class _Entries(cachetools.LRUCache):
    """cachetools' LRU, each value ``(entry, bytes)``, counting what it evicts to make room."""

    def __init__(self, budget: int) -> None:
        super().__init__(maxsize=budget, getsizeof=lambda item: item[1])
        self.evicted = 0

    def popitem(self):
        self.evicted += 1
        return super().popitem()


class ReuseStore:
    """An LRU of entries with known sizes; ``budget`` bytes in all (0: keeps nothing). An entry's size is what it
    holds: callers store compact tensors (copies, never views into a larger buffer)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, int(budget))
        self._items = _Entries(self.budget)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def used(self) -> int:
        return int(self._items.currsize)

    @property
    def evicted(self) -> int:
        return self._items.evicted

    def get(self, key):
        item = self._items.get(key)  # marks it most recently used
        return None if item is None else item[0]

    def put(self, key, value, size: int) -> bool:
        """Keep ``value`` (evicting the least recently used entries to make room); False when it alone is over
        the budget."""
        if not self.enabled or size > self.budget:
            return False
        self._items[key] = (value, size)
        return True

    def values(self, kind: str):
        """The entries whose key starts with ``kind`` (no LRU update: read through the base class)."""
        return [cachetools.Cache.__getitem__(self._items, k)[0] for k in list(self._items) if k[0] == kind]

    def clear(self) -> None:
        evicted = self._items.evicted
        self._items = _Entries(self.budget)
        self._items.evicted = evicted

    # -- prompt prefixes -----------------------------------------------------------------------------------------

    def best_prefix(self, ids: list[int], visual_key: tuple, first_visual: int) -> tuple[Prefix | None, int]:
        """(entry, tokens to reuse) for a prompt: all of it when a saved prompt is the same (same tokens and visual
        content); else the longest common prefix with a saved one, at most all but the prompt's last token; where
        the visual content differs, only the text before the first visual token."""
        want = np.asarray(ids, dtype=np.int64)
        best, best_n = None, 0
        for entry in self.values("prefix"):
            m = min(len(want), len(entry.ids))
            diff = np.flatnonzero(entry.ids[:m] != want[:m])
            n = int(diff[0]) if diff.size else m
            if entry.visual_key != visual_key:
                n = min(n, first_visual)
            if n == len(want) and len(entry.ids) != len(want):
                n -= 1  # a longer saved prompt: its hidden state is not this prompt's last token's
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self.get(("prefix", best.visual_key, best.ids.tobytes()))  # most recently used
        return best, best_n

    def save_prefix(self, ids: list[int], visual_key: tuple, cache: KVCache, hidden: torch.Tensor) -> None:
        """Copy a prompt's cache (every layer, right after its prefill) and its last token's trunk output."""
        n = len(ids)
        if n < 1 or not self.enabled or cache.length != n:
            return
        size = cache.layers * 2 * nbytes(cache.keys[0][:, :n]) + nbytes(hidden)
        if size > self.budget:
            return
        key_ids = np.asarray(ids, dtype=np.int64)
        key = ("prefix", visual_key, key_ids.tobytes())
        if self.get(key) is not None:
            return
        entry = Prefix(key_ids, visual_key, [k[:, :n].clone() for k in cache.keys],
                       [v[:, :n].clone() for v in cache.values], hidden.clone())
        self.put(key, entry, entry.nbytes)


def restore_prefix(cache: KVCache, entry: Prefix, n: int) -> None:
    """Write a saved prefix's first ``n`` entries into an empty cache."""
    for dst, src in ((cache.keys, entry.keys), (cache.values, entry.values)):
        for d, s in zip(dst, src):
            d[:, :n].copy_(s[:, :n])
    cache.length = n
