"""The Qwen3-VL export contract: Qwen2.5-VL's trunk contract plus DeepStack, and this family's vision graph.

trunk.onnx
| name                       | shape                          | dtype       |
|----------------------------|--------------------------------|-------------|
| inputs_embeds              | [B, S, hidden]                 | model dtype |
| position_ids               | [3, B, S]                      | int64       |
| cache_length               | [B]                            | int64       |
| deepstack_embeds           | [K, B, S, hidden]              | model dtype |
| past_key.i, past_value.i   | [B, P, kv_heads, head_dim]     | model dtype |
| hidden (out)               | [B, S, hidden]                 | model dtype |
| key.i, value.i (out)       | [B, S, kv_heads, head_dim]     | model dtype |
``deepstack_embeds``: the K DeepStack features, row k added to the output of decoder layer k; zero at every
position that is not a visual token. A prefill passes the features the vision graph produced, scattered to the
visual positions; a decode step (S = 1, never a visual token) passes zeros. Present only when K > 0.

vision.onnx
| name            | shape                   | dtype       |
|-----------------|-------------------------|-------------|
| pixel_values    | [N, 3*tp*p*p]           | model dtype |
| rotary_pos      | [F, 2]                  | int64       |
| pos_index       | [F, 4]                  | int64       |
| pos_weight      | [F, 4]                  | float32     |
| embeds (out)    | [M, hidden]             | model dtype |
| deepstack (out) | [K, M, hidden]          | model dtype |
N patches, F = patches per frame (N = T*F), M = N / merge^2 merged tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from models.qwen2_5_vl import spec as base
from models.qwen2_5_vl.spec import GraphSpec
from models.qwen3_vl.vision import VISION_INPUTS, VISION_OUTPUTS, vision_inputs

DEEPSTACK_INPUT = "deepstack_embeds"


def trunk_io_names(num_layers: int, deepstack_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the trunk graph with ``num_layers`` layers (decoder layers - 1)."""
    inputs, outputs = base.trunk_io_names(num_layers)
    return inputs[:3] + ([DEEPSTACK_INPUT] if deepstack_layers else []) + inputs[3:], outputs


def graph_contract(config: dict, graph: str) -> tuple[list[str], list[str]]:
    """Input and output names of ``graph`` for a stored config (the manifest's ``config``)."""
    if graph == "vision":
        return list(VISION_INPUTS), list(VISION_OUTPUTS)
    text = config["text"]
    return trunk_io_names(int(text["num_hidden_layers"]) - 1, int(text["deepstack_layers"]))


class TrunkGraph(nn.Module):
    """The trunk with the graph's argument order (cache_length and the DeepStack features before the past)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, inputs_embeds, position_ids, cache_length, *rest):
        if self.trunk.levels:
            deepstack, past = rest[0], rest[1:]
        else:
            deepstack, past = None, rest
        return self.trunk(inputs_embeds, position_ids, *past, cache_length=cache_length, deepstack=deepstack)


def trunk_spec(model, dtype: torch.dtype, device="cpu", seq: int = 3, past: int = 2) -> GraphSpec:
    """The trunk graph's spec: Qwen2.5-VL's (q/k/v and gate/up fused; this fuses the model's trunk layers in
    place) with the DeepStack input after ``cache_length``."""
    spec = base.trunk_spec(model, dtype, device, seq, past)
    t = model.cfg.text
    if not t.deepstack_layers:
        return replace(spec, module=TrunkGraph(model.trunk))
    deepstack = torch.randn(t.deepstack_layers, 1, seq, t.hidden_size, dtype=dtype, device=device)
    return replace(spec, module=TrunkGraph(model.trunk), example=(*spec.example[:3], deepstack, *spec.example[3:]),
                   input_names=trunk_io_names(model.trunk.num_layers, t.deepstack_layers)[0],
                   dynamic_axes={**spec.dynamic_axes, DEEPSTACK_INPUT: {1: "batch", 2: "seq"}})


def vision_spec(model, dtype: torch.dtype, device="cpu", grid=(2, 8, 12)) -> GraphSpec:
    v = model.cfg.vision
    n = grid[0] * grid[1] * grid[2]
    idx = vision_inputs(grid, v)
    example = (torch.randn(n, v.patch_dim, dtype=dtype, device=device), *(x.to(device) for x in idx.values()))
    axes = {"pixel_values": {0: "patches"}, "rotary_pos": {0: "frame_patches"}, "pos_index": {0: "frame_patches"},
            "pos_weight": {0: "frame_patches"}, "embeds": {0: "tokens"}, "deepstack": {1: "tokens"}}
    return GraphSpec("vision", model.visual, example, list(VISION_INPUTS), list(VISION_OUTPUTS), axes,
                     int_inputs=("rotary_pos", "pos_index"))


def export_spec(model, dtype: torch.dtype, device="cpu") -> list[GraphSpec]:
    """Every graph this model family exports, with its wrapper module and example inputs."""
    return [vision_spec(model, dtype, device), trunk_spec(model, dtype, device)]


def trt_vision_shapes(cfg, max_patches: int, max_frame_patches: int) -> dict:
    """TensorRT profile of the vision graph: input name -> (min, opt, max) shape."""
    v = cfg.vision
    unit = v.spatial_merge_size**2
    opt, fopt = min(max_patches, 4096), min(max_frame_patches, 1024)
    frame = ((unit,), (fopt,), (max_frame_patches,))
    return {"pixel_values": ((unit, v.patch_dim), (opt, v.patch_dim), (max_patches, v.patch_dim)),
            **{name: tuple((s[0], width) for s in frame) for name, width in
               (("rotary_pos", 2), ("pos_index", 4), ("pos_weight", 4))}}
