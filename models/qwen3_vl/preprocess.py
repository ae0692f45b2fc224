"""Qwen3-VL's video rules, as its video processor (``Qwen3VLVideoProcessor``) applies them: how many frames to
sample and the frames' common size (a pixel budget over all frames together). The timestamps its prompts
write come from ``models.preprocess.patch_timestamps``."""

from __future__ import annotations

import math

import numpy as np

from models.errors import InputError


def sample_indices(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """``fps`` frames per second of video within [min_frames, max_frames] (and at most every frame), spread
    evenly from the first to the last frame."""
    if total_frames < 1:
        raise InputError("the video has no frames")
    n = int(total_frames / max(video_fps, 1e-6) * fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def frame_size(num_frames: int, height: int, width: int, factor: int, temporal_factor: int, min_pixels: int,
               max_pixels: int) -> tuple[int, int]:
    """Per-frame target size: multiples of ``factor``, aspect ratio kept, frames x height x width inside
    [min_pixels, max_pixels] (the frame count rounded to the temporal patch size)."""
    if min(height, width) < 1:
        raise InputError(f"video frames of size {width}x{height} are empty")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"aspect ratio {width}x{height} is beyond 200:1; crop the frames first")
    num_frames = max(num_frames, temporal_factor)  # a one-frame video is padded to one temporal patch
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if t_bar * h_bar * w_bar > max_pixels:
        # very elongated frames: the short side is clamped up to one factor, so the reference rule can overshoot
        # its own budget; trim the long side to stay within it (a deviation only where the reference exceeds it)
        if h_bar >= w_bar:
            h_bar = max(factor, max_pixels // t_bar // w_bar // factor * factor)
        else:
            w_bar = max(factor, max_pixels // t_bar // h_bar // factor * factor)
    return h_bar, w_bar
