"""The Qwen2.5-VL vision encoder, written so that it exports without data-dependent control flow.

The original model computes window indices and cumulative sequence lengths with Python loops over
``grid_thw``. Here ``vision_indices`` computes them on the host and the encoder takes them as inputs.
One call encodes one visual input (an image, or a video of T temporal patches): attention is per frame
(full-attention blocks) or per window inside a frame (the other blocks), so after the window
permutation the encoder works on a [T, H*W, C] tensor and a frame-local [H*W, H*W] window mask built
in-graph from ``window_segments``. That keeps memory at T * (H*W)^2 instead of (T*H*W)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.qwen2_5_vl.config import VISION_NORM_EPS, VISION_ROPE_THETA, VisionConfig
from models.qwen2_5_vl.layers import GatedMLP, RMSNorm, apply_rotary, upcast

VISION_INPUTS = ("pixel_values", "rotary_pos", "window_index", "reverse_index", "window_segments")
VISION_OUTPUTS = ("embeds",)


@dataclass
class VisionIndices:
    """Index tensors for one visual input of grid (t, h, w) patches, all int64."""

    rotary_pos: torch.Tensor  # [N, 2] (row, col) of each patch, in window order
    window_index: torch.Tensor  # [N / unit] merged-token order used inside the encoder
    reverse_index: torch.Tensor  # [N / unit] inverse permutation, back to raster order
    window_segments: torch.Tensor  # [h * w] window id of each position inside one frame

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in VISION_INPUTS[1:]}


def vision_indices(grid_thw: tuple[int, int, int], cfg: VisionConfig) -> VisionIndices:
    """Precompute everything the original encoder derives from grid_thw with Python loops."""
    t, h, w = (int(x) for x in grid_thw)
    m = cfg.spatial_merge_size
    unit = m * m
    if h % m or w % m:
        raise ValueError(f"grid {grid_thw} is not a multiple of the spatial merge size {m}")
    lh, lw = h // m, w // m
    # (row, col) of every patch in the merged-block raster order the processor emits
    rows = torch.arange(h).view(lh, m, 1, 1).expand(lh, m, lw, m).permute(0, 2, 1, 3).reshape(-1)
    cols = torch.arange(w).view(1, 1, lw, m).expand(lh, m, lw, m).permute(0, 2, 1, 3).reshape(-1)
    pos = torch.stack((rows, cols), dim=-1)  # [h*w, 2]

    # window partition of one frame, over merged tokens
    win = cfg.window_size // m // cfg.patch_size
    pad_h, pad_w = win - lh % win, win - lw % win
    idx = torch.arange(lh * lw).view(lh, lw)
    idx = nn.functional.pad(idx, (0, pad_w, 0, pad_h), value=-1)
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    idx = idx.view(nh, win, nw, win).permute(0, 2, 1, 3).reshape(nh * nw, win * win)
    seg = torch.arange(nh * nw).unsqueeze(1).expand_as(idx)
    keep = idx >= 0
    frame_order, frame_seg = idx[keep], seg[keep]  # [lh*lw] each
    window_index = torch.cat([frame_order + f * lh * lw for f in range(t)])
    patch_order = (window_index.unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)
    rotary_pos = pos.repeat(t, 1)[patch_order]
    return VisionIndices(
        rotary_pos=rotary_pos.long(),
        window_index=window_index.long(),
        reverse_index=torch.argsort(window_index).long(),
        window_segments=frame_seg.repeat_interleave(unit).long(),
    )


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        # x [T, L, C] with L = h*w patches of one frame; cos/sin [T, L, 1, head_dim] fp32
        t, length, c = x.shape
        q, k, v = self.qkv(x).view(t, length, 3, self.heads, self.head_dim).unbind(2)
        q = apply_rotary(upcast(q), cos, sin).to(x.dtype).transpose(1, 2)  # [T, heads, L, head_dim]
        k = apply_rotary(upcast(k), cos, sin).to(x.dtype).transpose(1, 2)
        v = v.transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5)
        scores = upcast(scores)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(t, length, c)
        return self.proj(out)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.norm2 = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over one flattened patch, i.e. a matrix product."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        tp, p = cfg.temporal_patch_size, cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, (tp, p, p), (tp, p, p), bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return torch.matmul(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1).t())


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, VISION_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.Linear(self.dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.dim))


class VisionEncoder(nn.Module):
    """forward(pixel_values [N, patch_dim], rotary_pos [N,2], window_index [M], reverse_index [M],
    window_segments [h*w]) -> embeds [M, out_hidden], M = N / merge_size^2, in the processor's order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unit = cfg.spatial_merge_size**2
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)
        self.register_buffer("inv_freq", self.rotary_inv_freq(cfg), persistent=False)
        self.full_blocks = set(cfg.fullatt_block_indexes)

    @staticmethod
    def rotary_inv_freq(cfg: VisionConfig) -> torch.Tensor:
        """2D rotary: head_dim/4 frequencies, shared by the row and the column axis."""
        quarter = cfg.head_dim // 2
        return 1.0 / (VISION_ROPE_THETA ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))

    def forward(self, pixel_values, rotary_pos, window_index, reverse_index, window_segments):
        x = self.patch_embed(pixel_values)  # [N, C]
        n, c = x.shape
        x = x.reshape(-1, self.unit, c)[window_index].reshape(n, c)
        frame = window_segments.shape[0]  # patches per frame
        freqs = (rotary_pos.float().unsqueeze(-1) * self.inv_freq).flatten(1)  # [N, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1).reshape(-1, frame, 1, self.cfg.head_dim)
        cos, sin = emb.cos(), emb.sin()
        window_mask = window_segments.unsqueeze(0) == window_segments.unsqueeze(1)  # [h*w, h*w]
        x = x.reshape(-1, frame, c)  # [T, h*w, C]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if i in self.full_blocks else window_mask)
        out = self.merger(x.reshape(n, c))
        return out[reverse_index]
