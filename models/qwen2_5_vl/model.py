"""The whole Qwen2.5-VL model: vision encoder + decoder, loaded from a checkpoint directory.

``Qwen25VL.forward`` is the full-sequence reference (checked against transformers); the runtime uses
``model.visual``, ``model.trunk`` and ``model.head``, which share these weights.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import iter_tensors, read_config, resolve_dtype
from models.errors import CheckpointError
from models.qwen2_5_vl.config import Qwen25VLConfig
from models.qwen2_5_vl.decoder import LINEARS, Decoder, Head, MRoPE, Trunk
from models.qwen2_5_vl.positions import VisualSpan, mrope_positions
from models.qwen2_5_vl.vision import VisionEncoder, vision_indices

# checkpoint name prefix -> our module prefix; both layouts found in the wild
_PREFIXES = (
    ("model.language_model.", "decoder."),  # transformers 5
    ("model.visual.", "visual."),  # transformers 5
    ("visual.", "visual."),  # original release
    ("model.", "decoder."),  # original release
    ("lm_head.", "decoder.lm_head."),
)


def map_weight_name(name: str) -> str | None:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


class Qwen25VL(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.decoder = Decoder(cfg.text)

    # views over the decoder's weights, not registered as submodules so the state dict names each
    # weight once (cached_property writes to __dict__, bypassing nn.Module registration)
    @cached_property
    def trunk(self) -> Trunk:
        return Trunk(self.decoder)

    @cached_property
    def head(self) -> Head:
        return Head(self.decoder)

    def encode_visual(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        idx = vision_indices(grid_thw, self.cfg.vision)
        dev = pixel_values.device
        return self.visual(pixel_values, *(t.to(dev) for t in idx.as_dict().values()))

    def positions(self, input_ids, spans: list[VisualSpan]) -> tuple[torch.Tensor, int]:
        c = self.cfg
        return mrope_positions(input_ids, spans, c.image_token_id, c.video_token_id,
                               c.vision.spatial_merge_size, c.vision.tokens_per_second)

    def embed_prompt(self, input_ids: torch.Tensor, visuals: list[tuple[VisualSpan, torch.Tensor]]) -> torch.Tensor:
        """inputs_embeds [1, S, hidden]: token embeddings with each visual's embeddings merged in order."""
        embeds = self.decoder.embed_tokens(input_ids.view(1, -1))
        ids = input_ids.view(-1)
        if visuals:
            feats = [self.encode_visual(pv, span.grid_thw) for span, pv in visuals]
            is_pad = (ids == self.cfg.image_token_id) | (ids == self.cfg.video_token_id)
            merged = torch.cat(feats).to(embeds.dtype)
            if int(is_pad.sum()) != merged.shape[0]:
                raise ValueError(f"{int(is_pad.sum())} pad tokens but {merged.shape[0]} visual embeddings")
            embeds = embeds.clone()
            embeds[0, is_pad] = merged
        return embeds

    def prompt_inputs(self, input_ids: torch.Tensor, visuals) -> tuple[torch.Tensor, None]:
        """What the trunk's prefill takes besides positions: inputs_embeds, and no DeepStack features."""
        return self.embed_prompt(input_ids, list(visuals)), None

    def forward(self, input_ids: torch.Tensor, visuals: list[tuple[VisualSpan, torch.Tensor]] = ()) -> torch.Tensor:
        """Full-sequence logits [1, S, vocab] for one prompt (no cache)."""
        visuals = list(visuals)
        embeds = self.embed_prompt(input_ids, visuals)
        pos, _ = self.positions(input_ids.view(-1), [s for s, _ in visuals])
        return self.decoder(embeds, pos.unsqueeze(1).to(embeds.device))

    def reset_buffers(self, device=None) -> None:
        """Recompute the non-persistent rotary buffers (they are not in the checkpoint) on ``device`` (default:
        the embedding's)."""
        dev = device or self.decoder.embed_tokens.weight.device
        self.decoder.rotary.inv_freq = MRoPE(self.cfg.text).inv_freq.to(dev)
        self.visual.inv_freq = VisionEncoder.rotary_inv_freq(self.cfg.vision).to(dev)


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> Qwen25VL:
    """Build the model on the meta device and fill it from safetensors, one tensor at a time."""
    cfg = Qwen25VLConfig.from_dict(read_config(path))
    with torch.device("meta"):
        model = Qwen25VL(cfg)
    return fill_from_checkpoint(model, path, map_weight_name, dtype, device)


def fill_from_checkpoint(model: nn.Module, path: str | Path, map_name, dtype: str | torch.dtype = "fp32",
                         device: str | torch.device = "cpu") -> nn.Module:
    """Fill a model built on the meta device (one with ``cfg``, ``decoder`` and ``reset_buffers``) from the
    checkpoint's safetensors, one tensor at a time. ``map_name`` turns a checkpoint name into the model's (None:
    not a weight the model has). Every family's loader ends here."""
    cfg = model.cfg
    torch_dtype = resolve_dtype(dtype)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(path):
        key = map_name(name)
        if key is None or key not in expected:
            continue  # e.g. rotary inv_freq saved by old exporters
        state[key] = tensor.to(device=device, dtype=torch_dtype)
    tied = cfg.text.tie_word_embeddings and "decoder.embed_tokens.weight" in state
    if tied and "decoder.lm_head.weight" not in state:
        state["decoder.lm_head.weight"] = state["decoder.embed_tokens.weight"]
    missing = sorted(expected - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: the checkpoint lacks weights the model needs: {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.text.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.reset_buffers()
    return model.eval().requires_grad_(False)


HEAD_LINEARS = (*(f"layer.{lin}" for lin in LINEARS), "lm_head")  # what a quantized export quantizes in the head


def load_head(cfg: Qwen25VLConfig, path: str | Path, dtype: str | torch.dtype = "fp32",
              device: str | torch.device = "cpu", quantization: dict | None = None) -> Head:
    """The standalone head from an export's head.safetensors (the only PyTorch copy of these weights).
    ``quantization``: the manifest's entry; a quantized export's head holds quantized linears and embedding."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with torch.device("meta"):
        head = Head.standalone(cfg.text)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-export") from None
    torch_dtype = resolve_dtype(dtype)
    quantized = bool(quantization and quantization.get("scheme", "none") != "none")
    if quantized:
        from models.quantized import install_quantized

        state = install_quantized(head, state, HEAD_LINEARS, quantization["bits"], quantization["block_size"],
                                  torch_dtype, device)
        head.tied = False  # the LM head and the embedding are stored (and quantized) separately
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    if head.tied:
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    expected = {k for k, v in head.state_dict(keep_vars=True).items() if v is not None and v.device.type == "meta"}
    missing = sorted(expected - {k for k, v in state.items() if v is not None})
    if missing:
        raise CheckpointError(f"{path} lacks the head weights {', '.join(missing)}; re-export")
    try:
        head.load_state_dict(state, strict=not quantized, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config
        raise CheckpointError(f"{path} does not fit the manifest's config ({' '.join(str(e).split())[:300]}); "
                              "re-export") from None
    if head.tied:
        head.lm_head.weight = head.embed_tokens.weight
    head.rotary.inv_freq = MRoPE(cfg.text).inv_freq.to(device)
    return head.eval().requires_grad_(False)
