"""V-Reason (Lite): after prefill, drop the video tokens with the lowest value norms from every layer's cache.

Score of a video token: the L2 norm of its cached value over head_dim, averaged over heads and layers.
One keep-set serves all layers. The caller keeps generated tokens at their original rotary positions.
"""

from __future__ import annotations

import torch


def video_token_scores(values: list[torch.Tensor], video_index: torch.Tensor) -> torch.Tensor:
    """[n_video] mean over layers and heads of ||V||_2 (values: per layer [1, P, kv, hd])."""
    per_layer = [v[0].index_select(0, video_index).float().norm(dim=-1).mean(-1) for v in values]
    return torch.stack(per_layer).mean(0)


def lite_keep(values: list[torch.Tensor], length: int, video_index: torch.Tensor,
              ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep: cache indices kept, sorted; dropped: video cache indices removed; kept_video: the kept video
    tokens' new cache indices). Exactly floor(ratio * n_video) tokens, the lowest scored, are dropped."""
    n_drop = int(ratio * video_index.numel())
    scores = video_token_scores(values, video_index)
    order = torch.argsort(scores, stable=True)
    dropped = video_index[order[:n_drop]].sort().values
    mask = torch.ones(length, dtype=torch.bool, device=video_index.device)
    mask[dropped] = False
    keep = torch.nonzero(mask).view(-1)
    still_video = torch.zeros(length, dtype=torch.bool, device=video_index.device)
    still_video[video_index] = True
    kept_video = torch.nonzero(still_video[keep]).view(-1)
    return keep, dropped, kept_video
