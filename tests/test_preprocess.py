"""Preprocessing against transformers' own Qwen2-VL processing (the PIL image processor, no torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.errors import InputError
from models.preprocess import VisionSettings, process_image, process_video, sample_indices, smart_resize
from models.prompt import PAD, Tokenizer, load_chat_template, messages_for, prompt_ids


@pytest.mark.parametrize("hw", [(100, 150), (28, 28), (300, 40), (57, 83)])
def test_image_matches_transformers_pil_processor(tiny, hw):
    s = VisionSettings.from_dir(tiny)
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    pv, grid = process_image(img, s)
    ref = Qwen2VLImageProcessorPil.from_pretrained(tiny)(images=[img], return_tensors="np")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pv.shape == ref["pixel_values"].shape
    assert np.abs(pv - ref["pixel_values"]).max() <= 1e-5


def test_video_matches_pil_processor_frame_by_frame_with_temporal_grouping(tiny):
    s = VisionSettings.from_dir(tiny)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(5)]  # odd: last repeated
    pv, (t, gh, gw) = process_video(frames, s)
    assert t == 3
    h, w = smart_resize(90, 120, s.factor, s.video_min_pixels, s.video_max_pixels)
    image_proc = Qwen2VLImageProcessorPil(min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels,
                                          patch_size=14, temporal_patch_size=2, merge_size=2)
    per_frame = []
    for f in frames + [frames[-1]]:
        out = image_proc(images=[f], return_tensors="np")
        assert out["image_grid_thw"][0].tolist() == [1, h // 14, w // 14] == [1, gh, gw]
        per_frame.append(out["pixel_values"].reshape(gh * gw, 3, 2, 14, 14)[:, :, 0])  # copies of one frame
    # temporal patch i holds frames 2i and 2i+1 along the temporal axis of every patch
    want = np.concatenate([np.stack([per_frame[2 * i], per_frame[2 * i + 1]], axis=2) for i in range(t)])
    assert np.abs(pv - want.reshape(pv.shape)).max() <= 1e-5


def test_frame_sampling_follows_fps_and_bounds():
    s = VisionSettings(fps=2.0, min_frames=4, max_frames=16)
    assert len(sample_indices(300, 30.0, s)) == 16  # 10 s at 2 fps = 20, capped at 16
    assert len(sample_indices(90, 30.0, s)) == 6  # 3 s at 2 fps
    assert len(sample_indices(10, 30.0, s)) == 4  # below min_frames: raised to 4
    idx = sample_indices(91, 30.0, s)
    assert idx[0] == 0 and idx[-1] == 90 and np.all(np.diff(idx) > 0)
    assert len(sample_indices(1, 30.0, s)) == 1  # one-frame video works


def test_total_pixel_budget_shrinks_long_videos():
    s = VisionSettings(video_min_pixels=56 * 56, video_max_pixels=448 * 448, video_total_pixels=64 * 28 * 28 * 4)
    frames = [np.zeros((448, 448, 3), np.uint8)] * 16
    pv, (t, gh, gw) = process_video(frames, s)
    assert t * gh * gw * 14 * 14 <= s.video_total_pixels * 1.1
    assert gh * 14 * gw * 14 < 448 * 448


@pytest.mark.parametrize("kinds", [[], ["image"], ["video"], ["image", "video"]])
@pytest.mark.parametrize("template", ["plain", "reasoning"])
def test_prompt_ids_identical_to_transformers_tokenizer(tiny, kinds, template):
    counts = [(k, 6 if k == "image" else 12) for k in kinds]
    ours = prompt_ids(Tokenizer(tiny), load_chat_template(tiny), "Which shape moves left?", counts, template)
    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template(messages_for("Which shape moves left?", kinds, template),
                                   tokenize=False, add_generation_prompt=True)
    for kind, n in counts:  # what Qwen2_5_VLProcessor does with each pad token, in order
        text = text.replace(PAD[kind], "<|placeholder|>" * n, 1)
    for kind, _ in counts:
        text = text.replace("<|placeholder|>", PAD[kind], sum(n for k, n in counts if k == kind))
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert ours == want
    assert sum(1 for i in ours if i == tok.convert_tokens_to_ids(PAD["video"])) == (12 if "video" in kinds else 0)


def test_bad_frames_are_refused_clearly():
    s = VisionSettings()
    with pytest.raises(InputError, match="RGB uint8"):
        process_image(np.zeros((10, 10), np.uint8), s)
    with pytest.raises(InputError, match="no frames"):
        process_video([], s)
    with pytest.raises(InputError, match="differ in size"):
        process_video([np.zeros((56, 56, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)], s)
    with pytest.raises(InputError, match="aspect ratio"):
        process_image(np.zeros((1, 300, 3), np.uint8), s)


def test_resizing_while_decoding_changes_no_pixel(tmp_path):
    """Video files and frame folders are resized as each frame is read (BGR resized, then swapped): the same
    pixel values as resizing the full-size RGB frames afterwards."""
    import cv2

    from models.preprocess import resize_rgb
    from models.samples import render_frames, write_video
    from models.video import read_resized, read_video_timed

    s = VisionSettings()
    bgr = render_frames("square", "blue", "left", frames=8, size=(120, 200), seed=2)
    rgb = [np.ascontiguousarray(f[:, :, ::-1]) for f in bgr]
    for i, f in enumerate(bgr):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), f)
    files = sorted(tmp_path.glob("*.png"))
    want, grid = process_video(rgb, s)
    got, grid2 = process_video(read_resized(files, s), s, resized=True)
    assert grid == grid2 and np.array_equal(want, got)
    assert np.array_equal(resize_rgb(bgr[0], 56, 84)[:, :, ::-1], resize_rgb(rgb[0], 56, 84))
    video = write_video(tmp_path / "v.mp4", bgr, 4.0)
    frames, _, _ = read_video_timed(video, s)
    cap, native = cv2.VideoCapture(str(video)), []
    while (ok := cap.read())[0]:
        native.append(cv2.cvtColor(ok[1], cv2.COLOR_BGR2RGB))
    taken = [native[i] for i in sample_indices(len(native), 4.0, s)]
    assert np.array_equal(process_video(frames, s, resized=True)[0], process_video(taken, s)[0])
