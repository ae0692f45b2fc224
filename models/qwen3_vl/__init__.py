"""Qwen3-VL (dense): config, vision encoder with DeepStack, the shared Qwen decoder with q/k norms and
interleaved M-RoPE, timestamped video prompts, export spec. The module's names are the family interface
``models.registry`` describes."""

from __future__ import annotations

from models.qwen2_5_vl.decoder import LINEARS
from models.qwen2_5_vl.model import HEAD_LINEARS, load_head
from models.qwen2_5_vl.positions import VisualSpan
from models.qwen3_vl.config import Qwen3VLConfig as Config
from models.qwen3_vl.model import Qwen3VL, load_model
from models.qwen3_vl.positions import mrope_positions
from models.qwen3_vl.spec import TrunkGraph, export_spec, graph_contract, trt_vision_shapes
from models.qwen3_vl.vision import vision_inputs

Model = Qwen3VL
VIDEO_TIMESTAMPS = True  # "<t seconds>" before each frame; the frames' temporal position ids do not advance
# A temporal patch's vision features depend on its own pixels alone: every block attends within one frame, the
# learned position embeddings and 2D rotary are per (row, col) of a frame, the DeepStack mergers and the merger act
# per 2x2 block; time enters only through the prompt's timestamps. tests/test_reuse.py checks it.
FRAME_LOCAL_VISION = True


def prompt_positions(cfg: Config, ids, spans: list[VisualSpan]):
    return mrope_positions(ids, spans, cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size)


__all__ = ["Config", "FRAME_LOCAL_VISION", "HEAD_LINEARS", "LINEARS", "Model", "Qwen3VL", "TrunkGraph",
           "VIDEO_TIMESTAMPS", "export_spec", "graph_contract", "load_head", "load_model", "prompt_positions",
           "trt_vision_shapes", "vision_inputs"]
