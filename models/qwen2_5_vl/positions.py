"""M-RoPE position ids for text, image and video prompts, as the original Qwen2.5-VL release defines them.

- text: one id per token on all three axes, counting up;
- a visual segment of grid (t, h, w) (merged by spatial_merge_size) starting at position s gets
  temporal id s + floor(i * interval) for temporal patch i, where interval = tokens_per_second x
  seconds per temporal patch for videos and 1 for images (kept fractional until the integer
  conversion), height id s + row, width id s + col;
- text after a visual segment continues at that segment's largest id + 1.

Recent transformers releases continue text at s + max(h, w) / merge instead, which is lower than the
segment's largest id when the temporal ids outgrow the spatial ones (long videos); see docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualSpan:
    """One visual input in the prompt: its pad-token kind, grid and (videos) seconds per temporal patch."""

    kind: str  # "image" or "video"
    grid_thw: tuple[int, int, int]
    seconds_per_grid: float = 1.0


def visual_positions(start: int, grid_thw, merge: int, interval: float) -> torch.Tensor:
    """[3, t*h*w/merge^2] ids of one visual segment starting at ``start``."""
    t, h, w = (int(x) for x in grid_thw)
    lh, lw = h // merge, w // merge
    temporal = (torch.arange(t, dtype=torch.float64) * interval).long() + start
    tt = temporal.view(t, 1, 1).expand(t, lh, lw)
    hh = (torch.arange(lh) + start).view(1, lh, 1).expand(t, lh, lw)
    ww = (torch.arange(lw) + start).view(1, 1, lw).expand(t, lh, lw)
    return torch.stack((tt, hh, ww)).reshape(3, -1)


def mrope_positions(
    input_ids: list[int] | torch.Tensor,
    spans: list[VisualSpan],
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
) -> tuple[torch.Tensor, int]:
    """Position ids [3, S] for one prompt, and the id the first generated token gets."""
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    pads = {image_token_id: "image", video_token_id: "video"}
    pieces: list[torch.Tensor] = []
    nxt, i, span_iter = 0, 0, iter(spans)
    while i < len(ids):
        if ids[i] not in pads:
            j = i
            while j < len(ids) and ids[j] not in pads:
                j += 1
            pieces.append(torch.arange(nxt, nxt + j - i).view(1, -1).expand(3, -1))
            nxt += j - i
            i = j
            continue
        span = next(span_iter, None)
        if span is None or pads[ids[i]] != span.kind:
            raise ValueError("the prompt's visual pad tokens do not match the visual inputs given")
        n = span.grid_thw[0] * span.grid_thw[1] * span.grid_thw[2] // spatial_merge_size**2
        if ids[i : i + n] != [ids[i]] * n:
            raise ValueError(f"expected {n} consecutive {span.kind} pad tokens for grid {span.grid_thw}")
        interval = tokens_per_second * span.seconds_per_grid if span.kind == "video" else 1.0
        pos = visual_positions(nxt, span.grid_thw, spatial_merge_size, interval)
        pieces.append(pos)
        nxt = int(pos.max()) + 1
        i += n
    if next(span_iter, None) is not None:
        raise ValueError("more visual inputs were given than the prompt has pad-token segments")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions.long(), nxt
