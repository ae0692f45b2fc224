"""Which buffer goes to which graph tensor: one plan shared by the ONNX Runtime and TensorRT backends.

Dynamic (prefill, and decode where the cache grows), S new tokens on a cache holding P entries:
  inputs  inputs_embeds [1,S,H], position_ids [3,1,S], cache_length [1] = P,
          past_key.i / past_value.i = cache[:, :P] views
  outputs hidden [1,S,H] (caller's buffer), key.i / value.i = cache[:, P:P+S] views (written in place)
Static decode (one token, every shape and address the same at every step):
  inputs  inputs_embeds [1,1,H], position_ids [3,1,1], cache_length [1] = the device index where the
          token's entries go, past_key.i / past_value.i = the whole cache buffers [1,C,kv,hd]
  outputs hidden [1,1,H], key.i / value.i = staging buffers [1,1,kv,hd], copied into the cache at the
          index on the device afterwards (an engine's output may not alias its input)
Head-major (the ort backend's fused trunk on CPU, ``ort_trunk``; dynamic and static decode alike):
  inputs  inputs_embeds, position_ids, cache_length [1] = the entries before the new ones (``cache.length``, or
          the static step's device index), cache_key.i / cache_value.i = the layer's whole head-major buffers
          [1,kv,C,hd] (``KVCache.storage``)
  outputs hidden, present_key.i / present_value.i = the same buffers: GroupQueryAttention writes the new
          entries at cache_length in place and reads nothing past them
Rows (several requests' decode steps in one call of the standard graph; their caches are rows of one token-major
``runtime.pool.KVPool``, R rows of capacity C):
  inputs  inputs_embeds [R,1,H], position_ids [3,R,1], cache_length [R] = each row's length (where its new entries
          go), past_key.i / past_value.i = the pool's whole buffers [R,C,kv,hd] (each row masked to its length)
  outputs hidden [R,1,H], key.i / value.i = staging buffers [R,1,kv,hd], copied into each row at its length
          afterwards (``scatter_rows``)
Families with DeepStack (Qwen3-VL) add ``deepstack_embeds`` [K,1,S,H]: the prefill's features, zeros at decode
(``DeepStackFeed``). The vision graph's outputs are ``embeds`` [M,H] and, with DeepStack, ``deepstack`` [K,M,H].
All tensors are contiguous views of preallocated torch buffers, so a backend passes data pointers only.
"""

from __future__ import annotations

import torch

from runtime.cache import KVCache


def hidden_view(buffer: torch.Tensor, s: int, hidden: int, dtype: torch.dtype,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, [1, s, hidden] view of it) for the trunk's ``hidden`` output; a new buffer only when the
    old one is too small (prefill once, then every decode step reuses it)."""
    if buffer.numel() < s * hidden or buffer.dtype != dtype:
        buffer = torch.empty(s * hidden, dtype=dtype, device=device)
    return buffer, buffer[: s * hidden].view(1, s, hidden)


DEEPSTACK_INPUT, DEEPSTACK_OUTPUT = "deepstack_embeds", "deepstack"


class DeepStackFeed:
    """The trunk's ``deepstack_embeds`` input of a graph that has one (``levels`` K > 0): the prefill's features
    as given, or zeros [K,1,S,H] for calls without visual tokens (decode: zeros [K,rows,1,H] for ``rows`` requests'
    tokens, one buffer kept per row count, so that a binding made on one stays valid)."""

    def __init__(self, levels: int, hidden: int) -> None:
        self.levels, self.hidden = levels, hidden
        self._zeros: dict[tuple, torch.Tensor] = {}

    def inputs(self, deepstack: torch.Tensor | None, s: int, dtype: torch.dtype, device,
               rows: int = 1) -> dict[str, torch.Tensor]:
        if not self.levels:
            if deepstack is not None:
                raise ValueError("DeepStack features given to a trunk graph that takes none")
            return {}
        if deepstack is not None:
            if tuple(deepstack.shape) != (self.levels, 1, s, self.hidden):
                raise ValueError(f"DeepStack features {list(deepstack.shape)}, the graph takes "
                                 f"[{self.levels}, 1, {s}, {self.hidden}]")
            return {DEEPSTACK_INPUT: deepstack.to(dtype).contiguous()}
        if s != 1:
            return {DEEPSTACK_INPUT: torch.zeros(self.levels, 1, s, self.hidden, dtype=dtype, device=device)}
        key = (rows, dtype, torch.device(device))
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(self.levels, rows, 1, self.hidden, dtype=dtype, device=device)
        return {DEEPSTACK_INPUT: z}


def trunk_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   hidden: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``extra``: further inputs of the family's trunk contract (``DeepStackFeed.inputs``)."""
    s = embeds.shape[1]
    _check_hidden(hidden, s)
    inputs = {"inputs_embeds": embeds, "position_ids": positions,
              "cache_length": torch.tensor([cache.length], dtype=torch.long, device=embeds.device), **(extra or {})}
    outputs = {"hidden": hidden}
    for i in range(num_layers):
        pk, pv = cache.past(i)
        nk, nv = cache.slot(i, s)
        inputs[f"past_key.{i}"], inputs[f"past_value.{i}"] = pk, pv
        outputs[f"key.{i}"], outputs[f"value.{i}"] = nk, nv
    return _checked(inputs, outputs)


def static_trunk_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                          cache: KVCache, hidden: torch.Tensor, staging: list[torch.Tensor],
                          extra: dict[str, torch.Tensor] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bindings of a static decode step; ``staging`` holds 2 * num_layers buffers [1,1,kv,hd]."""
    if embeds.shape[1] != 1 or hidden.shape[:2] != (1, 1):
        raise ValueError("a static decode step takes exactly one token")
    return _whole_past(num_layers, embeds, positions, index, cache.keys, cache.values, hidden, staging, extra)


def rows_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, pool,
                  hidden: torch.Tensor, staging: list[torch.Tensor], extra: dict[str, torch.Tensor] | None = None,
                  rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bindings of a batched decode step over every row of a token-major pool, or its first ``rows`` (see above);
    ``staging`` holds 2 * num_layers buffers [R,1,kv,hd] (``staging_buffers(..., rows=R)``)."""
    if pool.head_major:
        raise ValueError("the standard trunk graph reads a token-major pool ([rows, capacity, kv, hd])")
    r = pool.rows if rows is None else rows
    if embeds.shape[:2] != (r, 1) or hidden.shape[:2] != (r, 1) or lengths.shape != (r,):
        raise ValueError(f"a batched step takes one token for each of the {r} rows it covers")
    return _whole_past(num_layers, embeds, positions, lengths, [k[:r] for k in pool.keys],
                       [v[:r] for v in pool.values], hidden, staging, extra)


def _whole_past(num_layers: int, embeds, positions, lengths, keys: list, values: list, hidden, staging: list,
                extra: dict | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The standard graph over whole cache buffers (masked to ``lengths``), its new entries to ``staging``."""
    inputs = {"inputs_embeds": embeds, "position_ids": positions, "cache_length": lengths, **(extra or {})}
    outputs = {"hidden": hidden}
    for i in range(num_layers):
        inputs[f"past_key.{i}"], inputs[f"past_value.{i}"] = keys[i], values[i]
        outputs[f"key.{i}"], outputs[f"value.{i}"] = staging[2 * i], staging[2 * i + 1]
    return _checked(inputs, outputs)


def scatter_rows(num_layers: int, pool, lengths: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Write a batched step's new entries into each row it covered (``lengths`` [R]: the pool's first R rows) at
    its length (no host sync)."""
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    for i in range(num_layers):
        pool.keys[i][rows, lengths] = staging[2 * i][:, 0]
        pool.values[i][rows, lengths] = staging[2 * i + 1][:, 0]


def head_major_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, length: torch.Tensor,
                        cache: KVCache, hidden: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bindings of the head-major trunk form; ``length`` [1]: where the new entries go."""
    _check_hidden(hidden, embeds.shape[1])
    storage = [cache.storage(i) for i in range(num_layers)]
    return _in_place(num_layers, embeds, positions, length, [k for k, _ in storage], [v for _, v in storage], hidden,
                     extra)


def head_major_rows_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                             pool, hidden: torch.Tensor, extra: dict[str, torch.Tensor] | None = None,
                             rows: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bindings of a batched decode step of the head-major trunk form over every row of a head-major pool (or its
    first ``rows``): its buffers [R,kv,C,hd] in place, ``lengths`` [R] where each row's new entries go."""
    if not pool.head_major:
        raise ValueError("the head-major trunk form reads a head-major pool ([rows, kv, capacity, hd])")
    n = pool.rows if rows is None else rows
    return _in_place(num_layers, embeds, positions, lengths, [k[:n] for k in pool.keys], [v[:n] for v in pool.values],
                     hidden, extra)


def _in_place(num_layers: int, embeds, positions, lengths, keys: list, values: list, hidden,
              extra: dict | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The head-major form over head-major buffers, each bound as its layer's input and output (written in place)."""
    inputs = {"inputs_embeds": embeds, "position_ids": positions, "cache_length": lengths, **(extra or {})}
    outputs = {"hidden": hidden}
    for i in range(num_layers):
        inputs[f"cache_key.{i}"] = outputs[f"present_key.{i}"] = keys[i]
        inputs[f"cache_value.{i}"] = outputs[f"present_value.{i}"] = values[i]
    return _checked(inputs, outputs)


def staging_buffers(held: list[torch.Tensor], num_layers: int, cache: KVCache, rows: int = 1) -> list[torch.Tensor]:
    """2 * num_layers buffers [rows,1,kv,hd] for a static or batched step's new entries, kept while they fit."""
    k = cache.keys[0]
    shape = (rows, 1, *k.shape[2:])
    if len(held) == 2 * num_layers and held[0].shape == shape and held[0].dtype == k.dtype \
            and held[0].device == k.device:
        return held
    return [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2 * num_layers)]


def scatter_staging(num_layers: int, cache: KVCache, index: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Write a static step's new entries into the cache at the device index (no host sync)."""
    for i in range(num_layers):
        cache.keys[i].index_copy_(1, index, staging[2 * i])
        cache.values[i].index_copy_(1, index, staging[2 * i + 1])


def _check_hidden(hidden: torch.Tensor, s: int) -> None:
    if hidden.shape[:2] != (1, s):
        raise ValueError(f"hidden buffer {list(hidden.shape)} does not fit {s} tokens")


def _checked(inputs: dict, outputs: dict) -> tuple[dict, dict]:
    for name, t in (*inputs.items(), *outputs.items()):
        if not t.is_contiguous():
            raise ValueError(f"tensor {name} is not contiguous; cannot bind it by address")
    return inputs, outputs


def vision_bindings(inputs: dict[str, torch.Tensor], embeds: torch.Tensor,
                    deepstack: torch.Tensor | None = None) -> tuple[dict, dict]:
    for name, t in inputs.items():
        if not t.is_contiguous():
            raise ValueError(f"tensor {name} is not contiguous; cannot bind it by address")
    outputs = {"embeds": embeds}
    if deepstack is not None:
        outputs[DEEPSTACK_OUTPUT] = deepstack
    return dict(inputs), outputs


def select_profile(seq: int, past: int) -> int:
    """TensorRT trunk profile: 0 = prefill (P = 0, S >= 1), 1 = decode (S = 1, P >= 1: the filled cache when
    dynamic, the whole fixed-capacity cache when static), 2 = suffix (S >= 2 new tokens on P >= 1 cached ones: a
    prompt's suffix after a reused prefix, or a later prefill chunk)."""
    if past == 0:
        return 0
    if seq == 1:
        return 1
    return 2
