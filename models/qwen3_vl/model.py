"""The whole Qwen3-VL model: vision encoder + decoder, loaded from a checkpoint directory.

The decoder is the shared Qwen decoder (``models.qwen2_5_vl.decoder``) configured by this family's
``TextConfig`` (q/k norms, interleaved M-RoPE, no attention bias). DeepStack: the vision encoder's K extra
features are added to the outputs of decoder layers 0..K-1 at the visual positions; here they travel as one
dense tensor [K, B, S, hidden] that is zero at every other position (adding zero leaves a value unchanged),
which is what the trunk graph takes during prefill. Decode steps carry no visual token and add nothing.

``Qwen3VL.forward`` is the full-sequence reference (checked against transformers); the runtime uses
``model.visual``, ``model.trunk`` and ``model.head``, which share these weights.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import read_config
from models.qwen2_5_vl.decoder import Decoder, Head, MRoPE, Trunk
from models.qwen2_5_vl.model import fill_from_checkpoint, map_weight_name
from models.qwen2_5_vl.positions import VisualSpan
from models.qwen3_vl.config import Qwen3VLConfig
from models.qwen3_vl.positions import mrope_positions
from models.qwen3_vl.vision import VisionEncoder, vision_inputs


class DeepStackTrunk(Trunk):
    """The trunk (layers 0..L-2) with DeepStack: ``deepstack`` [K, B, S, hidden] is added to the output of layer
    k < K. Without it (decode steps) this is the plain trunk; ``step`` (static decode) is inherited as is."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__(decoder)
        self.levels = decoder.cfg.deepstack_layers

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor,
                cache_length: torch.Tensor | None = None, deepstack: torch.Tensor | None = None):
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past[2 * i], past[2 * i + 1], cache_length)
            if deepstack is not None and i < self.levels:
                x = x + deepstack[i].to(x.dtype)
            new += [k, v]
        return (x, *new)


class Qwen3VL(nn.Module):
    def __init__(self, cfg: Qwen3VLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.decoder = Decoder(cfg.text)

    # views over the decoder's weights, not registered as submodules (see Qwen25VL)
    @cached_property
    def trunk(self) -> DeepStackTrunk:
        return DeepStackTrunk(self.decoder)

    @cached_property
    def head(self) -> Head:
        return Head(self.decoder)

    def encode_visual(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [M, hidden], deepstack [K, M, hidden]) of one visual input."""
        dev = pixel_values.device
        return self.visual(pixel_values, *(t.to(dev) for t in vision_inputs(grid_thw, self.cfg.vision).values()))

    def positions(self, input_ids, spans: list[VisualSpan]) -> tuple[torch.Tensor, int]:
        c = self.cfg
        return mrope_positions(input_ids, spans, c.image_token_id, c.video_token_id, c.vision.spatial_merge_size)

    def prompt_inputs(self, input_ids: torch.Tensor,
                      visuals) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds [1, S, hidden], deepstack [K, 1, S, hidden] or None without visuals): token embeddings
        with each visual's embeddings merged in order, and the DeepStack features at the same positions."""
        visuals = list(visuals)
        embeds = self.decoder.embed_tokens(input_ids.view(1, -1))
        if not visuals:
            return embeds, None
        ids = input_ids.view(-1)
        feats = [self.encode_visual(pv, span.grid_thw) for span, pv in visuals]
        is_pad = (ids == self.cfg.image_token_id) | (ids == self.cfg.video_token_id)
        merged = torch.cat([f for f, _ in feats]).to(embeds.dtype)
        if int(is_pad.sum()) != merged.shape[0]:
            raise ValueError(f"{int(is_pad.sum())} pad tokens but {merged.shape[0]} visual embeddings")
        embeds = embeds.clone()
        embeds[0, is_pad] = merged
        return embeds, scatter_deepstack([d for _, d in feats], is_pad, embeds.dtype)

    def embed_prompt(self, input_ids: torch.Tensor, visuals) -> torch.Tensor:
        return self.prompt_inputs(input_ids, visuals)[0]

    def forward(self, input_ids: torch.Tensor, visuals: list[tuple[VisualSpan, torch.Tensor]] = ()) -> torch.Tensor:
        """Full-sequence logits [1, S, vocab] for one prompt (no cache)."""
        visuals = list(visuals)
        embeds, deepstack = self.prompt_inputs(input_ids, visuals)
        pos, _ = self.positions(input_ids.view(-1), [s for s, _ in visuals])
        dec = self.decoder
        cos, sin = dec.rotary(pos.unsqueeze(1).to(embeds.device), embeds.dtype)
        empty = dec.empty_cache(1, embeds.device, embeds.dtype)
        x = embeds
        for i, layer in enumerate(dec.layers):
            x, _, _ = layer(x, cos, sin, empty, empty)
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i]
        return dec.lm_head(dec.norm(x))

    def reset_buffers(self, device=None) -> None:
        """Recompute the non-persistent rotary buffers (they are not in the checkpoint) on ``device`` (default:
        the embedding's)."""
        dev = device or self.decoder.embed_tokens.weight.device
        self.decoder.rotary.inv_freq = MRoPE(self.cfg.text).inv_freq.to(dev)
        self.visual.inv_freq = VisionEncoder.rotary_inv_freq(self.cfg.vision).to(dev)


def scatter_deepstack(features: list[torch.Tensor], is_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-visual DeepStack features [K, M_i, hidden] -> [K, 1, S, hidden], zero where ``is_pad`` [S] is False."""
    if not features or features[0].shape[0] == 0:
        return None
    merged = torch.cat(features, dim=1).to(dtype)
    out = merged.new_zeros(merged.shape[0], 1, is_pad.shape[0], merged.shape[-1])
    out[:, 0, is_pad.to(out.device)] = merged
    return out


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> Qwen3VL:
    """Build the model on the meta device and fill it from safetensors (both layouts name weights alike:
    ``model.language_model.*``, ``model.visual.*``, ``lm_head.*``)."""
    cfg = Qwen3VLConfig.from_dict(read_config(path))
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    return fill_from_checkpoint(model, path, map_weight_name, dtype, device)
