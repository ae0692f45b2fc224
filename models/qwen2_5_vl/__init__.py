"""Qwen2.5-VL: config, vision encoder, trunk/head decoder split, M-RoPE positions, export spec.

The module's names are the family interface ``models.registry`` describes."""

from __future__ import annotations

from models.qwen2_5_vl.config import Qwen25VLConfig as Config
from models.qwen2_5_vl.decoder import LINEARS
from models.qwen2_5_vl.model import HEAD_LINEARS, Qwen25VL, load_head, load_model
from models.qwen2_5_vl.positions import VisualSpan, mrope_positions
from models.qwen2_5_vl.spec import TrunkGraph, export_spec, trunk_io_names
from models.qwen2_5_vl.vision import VISION_INPUTS, VISION_OUTPUTS, vision_indices

Model = Qwen25VL
VIDEO_TIMESTAMPS = False  # time enters through the temporal position ids (tokens_per_second)
# Whether the vision encoder's output for one temporal patch depends on that patch's pixels alone (so a patch's
# features can be cached and reused in another clip). Here: the patch embedding, norms, MLPs and merger act per
# patch; the window blocks attend inside windows of one frame and the full blocks inside one frame
# (``VisionEncoder`` works on [T, h*w, C]); the 2D rotary positions are (row, col) within the frame; nothing
# carries time. tests/test_reuse.py checks it against encoding the whole clip.
FRAME_LOCAL_VISION = True


def graph_contract(config: dict, graph: str) -> tuple[list[str], list[str]]:
    """Input and output names of ``graph`` for a stored config (the manifest's ``config``)."""
    if graph == "vision":
        return list(VISION_INPUTS), list(VISION_OUTPUTS)
    return trunk_io_names(int(config["text"]["num_hidden_layers"]) - 1)


def vision_inputs(grid_thw, vision_cfg) -> dict:
    return vision_indices(grid_thw, vision_cfg).as_dict()


def prompt_positions(cfg: Config, ids, spans: list[VisualSpan]):
    return mrope_positions(ids, spans, cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size,
                           cfg.vision.tokens_per_second)


__all__ = ["Config", "FRAME_LOCAL_VISION", "HEAD_LINEARS", "LINEARS", "Model", "Qwen25VL", "TrunkGraph",
           "VIDEO_TIMESTAMPS", "VisualSpan", "export_spec", "graph_contract", "load_head", "load_model",
           "mrope_positions", "prompt_positions", "vision_inputs"]
