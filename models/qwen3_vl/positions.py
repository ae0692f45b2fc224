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

from models.qwen2_5_vl.positions import VisualSpan, visual_positions


def frame_runs(spans: list[VisualSpan]) -> list[tuple[str, tuple[int, int, int]]]:
    """(kind, grid) of every run of pad tokens the prompt holds: an image is one run, a video one per frame."""
    runs = []
    for span in spans:
        t, h, w = (int(x) for x in span.grid_thw)
        runs += [(span.kind, (1, h, w))] * (t if span.kind == "video" else 1)
    return runs


def mrope_positions(input_ids: list[int] | torch.Tensor, spans: list[VisualSpan], image_token_id: int,
                    video_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """Position ids [3, S] for one prompt, and the id the first generated token gets."""
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    pads = {image_token_id: "image", video_token_id: "video"}
    m = spatial_merge_size
    pieces: list[torch.Tensor] = []
    nxt, i, runs = 0, 0, iter(frame_runs(spans))
    while i < len(ids):
        j = i
        if ids[i] not in pads:
            while j < len(ids) and ids[j] not in pads:
                j += 1
            pieces.append(torch.arange(nxt, nxt + j - i).view(1, -1).expand(3, -1))
            nxt += j - i
            i = j
            continue
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        run = next(runs, None)
        if run is None or pads[ids[i]] != run[0]:
            raise ValueError("the prompt's visual pad tokens do not match the visual inputs given")
        _, h, w = run[1]
        n = h * w // m**2
        if j - i != n:
            raise ValueError(f"expected a run of {n} {run[0]} pad tokens for a frame of grid {run[1]}, got {j - i}")
        pieces.append(visual_positions(nxt, run[1], m, 1.0))
        nxt += max(h, w) // m
        i = j
    if next(runs, None) is not None:
        raise ValueError("more visual frames were given than the prompt has pad-token runs")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions.long(), nxt
