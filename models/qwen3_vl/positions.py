"""M-RoPE position ids of a Qwen3-VL prompt, as transformers' ``Qwen3VLModel.get_rope_index`` computes them.

- text: one id per token on all three axes, counting up;
- an image of grid (1, h, w), merged by spatial_merge_size into (lh, lw), starting at position s: temporal
  id s, height id s + row, width id s + col; the text after it continues at s + max(lh, lw);
- a video is a sequence of frames (one per temporal patch), each its own run of pad tokens between
  ``<t seconds><|vision_start|>`` and ``<|vision_end|>``, each placed like an image of grid (1, h, w).
  Time enters through the timestamp text, not through the temporal ids.
"""

from __future__ import annotations

import torch

from models.qwen2_5_vl.positions import VisualSpan
from models.qwen2_5_vl.positions import mrope_positions as frame_positions


def frame_runs(spans: list[VisualSpan]) -> list[VisualSpan]:
    """Every run of pad tokens the prompt holds, as a visual of one temporal patch: an image is one run, a
    video one per frame."""
    runs = []
    for span in spans:
        t, h, w = (int(x) for x in span.grid_thw)
        runs += [VisualSpan(span.kind, (1, h, w))] * (t if span.kind == "video" else 1)
    return runs


def mrope_positions(input_ids: list[int] | torch.Tensor, spans: list[VisualSpan], image_token_id: int,
                    video_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """Position ids [3, S] for one prompt, and the id the first generated token gets.

    Qwen2.5-VL's placement applied to single-frame runs: with one temporal patch the temporal id is the start
    (no time interval enters) and the largest id + 1 is start + max(lh, lw), as transformers continues."""
    return frame_positions(input_ids, frame_runs(spans), image_token_id, video_token_id, spatial_merge_size, 1.0)
