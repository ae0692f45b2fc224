"""The export contract, owned by the model: graph input/output names, shapes, dynamic axes, examples.

Graph names come from ``trunk_io_names`` / ``VISION_INPUTS`` only; export and runtime both import them.

trunk.onnx
| name                       | shape                          | dtype       |
|----------------------------|--------------------------------|-------------|
| inputs_embeds              | [B, S, hidden]                 | model dtype |
| position_ids               | [3, B, S]                      | int64       |
| cache_length               | [B]                            | int64       |
| past_key.i, past_value.i   | [B, P, kv_heads, head_dim]     | model dtype |
| hidden (out)               | [B, S, hidden]                 | model dtype |
| key.i, value.i (out)       | [B, S, kv_heads, head_dim]     | model dtype |
``cache_length``: how many leading past entries of each row are valid (the rest are masked). Dynamic decode passes
the filled cache (P = cache_length, growing per token); static decode passes the whole fixed-capacity cache
(P = capacity, the same shape every token) and its fill level, and writes the new entries at that index; a batch
of requests (one row each, ``runtime.pool``) passes their caches' buffers whole and each row's length.

vision.onnx
| name            | shape                   | dtype       |
|-----------------|-------------------------|-------------|
| pixel_values    | [N, 3*tp*p*p]           | model dtype |
| rotary_pos      | [N, 2]                  | int64       |
| window_index    | [M]                     | int64       |
| reverse_index   | [M]                     | int64       |
| window_segments | [F]                     | int64       |
| embeds (out)    | [M, hidden]             | model dtype |
N patches, M = N / merge^2 merged tokens, F = patches per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.qwen2_5_vl.vision import VISION_INPUTS, VISION_OUTPUTS, vision_indices


def trunk_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the trunk graph with ``num_layers`` layers (decoder layers - 1)."""
    past = [n for i in range(num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]
    new = [n for i in range(num_layers) for n in (f"key.{i}", f"value.{i}")]
    return ["inputs_embeds", "position_ids", "cache_length", *past], ["hidden", *new]


@dataclass
class GraphSpec:
    name: str  # file stem: trunk or vision
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    int_inputs: tuple[str, ...] = ()


class TrunkGraph(nn.Module):
    """The trunk with the graph's argument order (``cache_length`` before the past tensors)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, inputs_embeds, position_ids, cache_length, *past):
        return self.trunk(inputs_embeds, position_ids, *past, cache_length=cache_length)


def trunk_spec(model, dtype: torch.dtype, device="cpu", seq: int = 3, past: int = 2) -> GraphSpec:
    """The trunk graph's spec. Its layers are exported with q/k/v and gate/up each fused into one matmul (4 per
    layer instead of 7: fewer, larger kernels per decode step, as TensorRT Edge-LLM and onnxruntime-genai lay
    them out); this fuses the model's trunk layers in place (the head's layer is left as it is)."""
    for layer in model.trunk.layers:
        layer.fuse_projections()
    t = model.cfg.text
    n = model.trunk.num_layers
    inputs, outputs = trunk_io_names(n)
    cache = (1, past, t.num_key_value_heads, t.head_dim)
    example = (
        torch.randn(1, seq, t.hidden_size, dtype=dtype, device=device),
        (torch.arange(seq, device=device) + past).view(1, 1, seq).expand(3, 1, seq).contiguous(),
        torch.tensor([past], device=device),
        *(torch.randn(cache, dtype=dtype, device=device) for _ in range(2 * n)),
    )
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
            "cache_length": {0: "batch"}, "hidden": {0: "batch", 1: "seq"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 1: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 1: "seq"}
    return GraphSpec("trunk", TrunkGraph(model.trunk), example, inputs, outputs, axes,
                     int_inputs=("position_ids", "cache_length"))


def vision_spec(model, dtype: torch.dtype, device="cpu", grid=(2, 8, 12)) -> GraphSpec:
    v = model.cfg.vision
    idx = vision_indices(grid, v)
    n = grid[0] * grid[1] * grid[2]
    example = (torch.randn(n, v.patch_dim, dtype=dtype, device=device),
               *(x.to(device) for x in idx.as_dict().values()))
    axes = {"pixel_values": {0: "patches"}, "rotary_pos": {0: "patches"}, "window_index": {0: "tokens"},
            "reverse_index": {0: "tokens"}, "window_segments": {0: "frame_patches"}, "embeds": {0: "tokens"}}
    return GraphSpec("vision", model.visual, example, list(VISION_INPUTS), list(VISION_OUTPUTS), axes,
                     int_inputs=VISION_INPUTS[1:])


def export_spec(model, dtype: torch.dtype, device="cpu") -> list[GraphSpec]:
    """Every graph this model family exports, with its wrapper module and example inputs."""
    return [vision_spec(model, dtype, device), trunk_spec(model, dtype, device)]
