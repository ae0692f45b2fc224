"""The Qwen3-VL vision encoder, written so that it exports without data-dependent control flow.

Per visual input (an image, or a video of T temporal patches) of grid (t, h, w): a patch embedding (Conv3d
with kernel == stride, i.e. a matrix product, with bias), plus learned position embeddings bilinearly
interpolated (align_corners) from a square grid to (h, w), then blocks of LayerNorm, attention with 2D
rotary over one frame's h*w patches (every block attends within a frame; no windows), and a GELU MLP. The
merger (LayerNorm, 2x2 merge, MLP) gives the tokens; each DeepStack merger (LayerNorm after the 2x2 merge)
turns the output of one chosen block into the feature that decoder layer k adds at visual positions.

transformers derives the interpolation taps and rotary positions from ``grid_thw`` with Python; here
``vision_inputs`` computes them on the host for one frame (all frames of a visual share them) and the
encoder takes them as inputs, so the frame size is a dynamic axis of the graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.qwen2_5_vl.layers import activation
from models.qwen2_5_vl.vision import VisionAttention  # the same attention; here over whole frames (no window mask)
from models.qwen3_vl.config import VISION_NORM_EPS, VisionConfig

VISION_INPUTS = ("pixel_values", "rotary_pos", "pos_index", "pos_weight")
VISION_OUTPUTS = ("embeds", "deepstack")


def merge_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of one frame in the processor's order: merge x merge blocks in raster order."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def _taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (floor, floor + 1, clamped to the grid) and weights with align_corners=True."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def vision_inputs(grid_thw, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """The encoder's index inputs for one visual of grid (t, h, w), per frame of h*w patches:
    rotary_pos [h*w, 2] (row, col), pos_index [h*w, 4] and pos_weight [h*w, 4] (fp32): the four learned
    position embeddings each patch interpolates and their weights."""
    _, h, w = (int(x) for x in grid_thw)
    m = cfg.spatial_merge_size
    if h % m or w % m:
        raise ValueError(f"grid {tuple(grid_thw)} is not a multiple of the spatial merge size {m}")
    row, col = merge_order(h, w, m)
    side = cfg.grid_side
    ht, hw = _taps(row, h, side)
    wt, ww = _taps(col, w, side)
    index = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weight = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return {"rotary_pos": torch.stack((row, col), dim=-1).long(), "pos_index": index.long(),
            "pos_weight": weight.float()}


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin, None)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 merge and MLP to the decoder's width; the DeepStack mergers normalize after the merge."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.dim if postshuffle_norm else cfg.hidden_size, eps=VISION_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.dim, self.dim)
        self.linear_fc2 = nn.Linear(self.dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.dim)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        tp, p = cfg.temporal_patch_size, cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, (tp, p, p), (tp, p, p), bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return torch.matmul(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1).t()) + self.proj.bias


class VisionEncoder(nn.Module):
    """forward(pixel_values [N, patch_dim], rotary_pos [F, 2], pos_index [F, 4], pos_weight [F, 4]) ->
    (embeds [M, out_hidden], deepstack [K, M, out_hidden]); F = h*w patches per frame, N = T*F, M = N / merge^2,
    K DeepStack levels, in the processor's order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList([PatchMerger(cfg, postshuffle_norm=True)
                                                    for _ in cfg.deepstack_visual_indexes])
        self.register_buffer("inv_freq", self.rotary_inv_freq(cfg), persistent=False)

    @staticmethod
    def rotary_inv_freq(cfg: VisionConfig) -> torch.Tensor:
        """2D rotary: head_dim/4 frequencies, shared by the row and the column axis."""
        quarter = cfg.head_dim // 2
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))

    def forward(self, pixel_values, rotary_pos, pos_index, pos_weight):
        x = self.patch_embed(pixel_values)  # [N, C]
        n, c = x.shape
        frame = rotary_pos.shape[0]
        pos = (self.pos_embed(pos_index) * pos_weight.unsqueeze(-1)).sum(1)  # [F, C], fp32 weights as reference
        x = (x.reshape(-1, frame, c) + pos.to(x.dtype))  # [T, F, C]
        freqs = (rotary_pos.float().unsqueeze(-1) * self.inv_freq).flatten(1)  # [F, head_dim/2]: rows, then cols
        emb = torch.cat((freqs, freqs), dim=-1).view(1, frame, 1, -1)
        cos, sin = emb.cos(), emb.sin()
        levels = {layer: k for k, layer in enumerate(self.cfg.deepstack_visual_indexes)}
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if i in levels:
                deepstack.append(self.deepstack_merger_list[levels[i]](x.reshape(n, c)))
        embeds = self.merger(x.reshape(n, c))
        if not deepstack:
            return embeds, embeds.new_zeros(0, *embeds.shape)
        return embeds, torch.stack(deepstack)
