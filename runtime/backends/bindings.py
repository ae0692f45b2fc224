"""Which buffer goes to which graph tensor: one plan shared by the ONNX Runtime and TensorRT backends.

For a trunk call with S new tokens on a cache holding P entries:
  inputs  inputs_embeds [1,S,H], position_ids [3,1,S], past_key.i / past_value.i = cache[:, :P] views
  outputs hidden [1,S,H] (caller's buffer), key.i / value.i = cache[:, P:P+S] views (written in place)
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


def trunk_bindings(num_layers: int, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    s = embeds.shape[1]
    if hidden.shape[:2] != (1, s):
        raise ValueError(f"hidden buffer {list(hidden.shape)} does not fit {s} tokens")
    inputs = {"inputs_embeds": embeds, "position_ids": positions}
    outputs = {"hidden": hidden}
    for i in range(num_layers):
        pk, pv = cache.past(i)
        nk, nv = cache.slot(i, s)
        inputs[f"past_key.{i}"], inputs[f"past_value.{i}"] = pk, pv
        outputs[f"key.{i}"], outputs[f"value.{i}"] = nk, nv
    for name, t in (*inputs.items(), *outputs.items()):
        if not t.is_contiguous():
            raise ValueError(f"tensor {name} is not contiguous; cannot bind it by address")
    return inputs, outputs


def vision_bindings(inputs: dict[str, torch.Tensor], embeds: torch.Tensor) -> tuple[dict, dict]:
    for name, t in inputs.items():
        if not t.is_contiguous():
            raise ValueError(f"tensor {name} is not contiguous; cannot bind it by address")
    return dict(inputs), {"embeds": embeds}


def select_profile(seq: int, past: int) -> int:
    """TensorRT trunk profile: 0 = prefill (P = 0, S >= 1), 1 = decode (S = 1, P >= 1)."""
    if past == 0:
        return 0
    if seq == 1:
        return 1
    raise ValueError(f"no trunk profile takes S={seq} new tokens on P={past} cached ones "
                     "(prefill needs P = 0, decode S = 1)")
