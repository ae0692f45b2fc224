"""M-RoPE positions against hand-computed values (the original release's definition)."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from models import load_model
from models.qwen2_5_vl.positions import VisualSpan, mrope_positions

IMG, VID = 6, 7


def test_text_only_counts_up():
    pos, nxt = mrope_positions([1, 2, 3, 4], [], IMG, VID, 2, 2.0)
    assert pos.tolist() == [[0, 1, 2, 3]] * 3 and nxt == 4


def test_image_then_text():
    # 2 text tokens, image grid (1, 4, 6) -> merged 2 x 3 = 6 tokens starting at position 2
    ids = [1, 2] + [IMG] * 6 + [3, 4]
    pos, nxt = mrope_positions(ids, [VisualSpan("image", (1, 4, 6))], IMG, VID, 2, 2.0)
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert nxt == 7


def test_video_temporal_ids_are_fractional_until_the_end():
    # grid (3, 2, 2) -> 3 temporal patches of 1 merged token; tokens_per_second 2, 0.75 s per patch
    # -> interval 1.5: temporal offsets floor(0, 1.5, 3.0) = 0, 1, 3 (not 0, 1, 2 from rounding early)
    ids = [1] + [VID] * 3 + [2]
    pos, nxt = mrope_positions(ids, [VisualSpan("video", (3, 2, 2), 0.75)], IMG, VID, 2, 2.0)
    assert pos[0].tolist() == [0, 1, 2, 4, 5]
    assert pos[1].tolist() == [0, 1, 1, 1, 5]
    assert pos[2].tolist() == [0, 1, 1, 1, 5]
    assert nxt == 6


def test_long_video_text_continues_after_the_largest_id():
    # 8 temporal patches at interval 4 (2 tokens/s x 2 s): temporal ids reach 1 + 28 = 29, spatial only 1 + 1
    ids = [1] + [VID] * 8 * 4 + [2, 3]
    pos, nxt = mrope_positions(ids, [VisualSpan("video", (8, 4, 4), 2.0)], IMG, VID, 2, 2.0)
    assert pos[:, -2].tolist() == [30, 30, 30]
    assert nxt == 32


def test_text_after_a_video_continues_after_its_largest_id(tiny):
    """The original release's rule, computed by hand: text after a video continues at the segment's largest id
    + 1 (here the temporal ids, 1 + 7 * 2 * 2 = 29, outgrow the spatial ones), so the next text id is 30. The
    video's own ids agree with transformers'; the installed transformers continued the text at start +
    max(h, w) / merge instead (lower), a difference this test no longer depends on."""
    model = load_model(tiny)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    vid = model.cfg.video_token_id
    ids = torch.tensor([1] + [vid] * 8 * 4 + [2, 3])
    grid = torch.tensor([[8, 4, 4]])
    theirs, _ = ref.model.get_rope_index(ids[None], 2 * (ids == vid).int()[None], video_grid_thw=grid,
                                         second_per_grid_ts=torch.tensor([2.0]))
    ours, _ = model.positions(ids, [VisualSpan("video", (8, 4, 4), 2.0)])
    assert torch.equal(theirs[:, 0, :-2], ours[:, :-2])  # the video itself agrees
    largest = int(ours[:, 1:-2].max())
    assert largest == 1 + 7 * int(2.0 * model.cfg.vision.tokens_per_second)
    assert ours[:, -2].tolist() == [largest + 1] * 3 and ours[:, -1].tolist() == [largest + 2] * 3
