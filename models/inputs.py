"""A request's visual inputs and prompt: decoded frames -> pixel patches, index tensors, token ids, positions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import InputError
from models.preprocess import (
    VisionSettings,
    check_frame,
    patch_timestamps,
    process_image,
    process_video,
    sample_indices,
)
from models.qwen2_5_vl.positions import VisualSpan
from models.registry import family
from models.video import frame_files, read_image, read_resized, read_video_timed


@dataclass
class Visual:
    span: VisualSpan
    pixel_values: torch.Tensor  # [N, patch_dim]
    indices: dict[str, torch.Tensor]
    tokens: int  # merged tokens = pad tokens in the prompt
    timestamps: list[float] | None = None  # videos: seconds of each temporal patch (its frames' mean time)
    frames: int = 1  # frames sampled (an image: 1)
    _digests: list[bytes] | None = None

    def patch_digests(self) -> list[bytes]:
        """A content digest of each temporal patch's pixels (computed once)."""
        if self._digests is None:
            t, h, w = self.span.grid_thw
            per = h * w
            self._digests = [digest(self.pixel_values[i * per:(i + 1) * per]) for i in range(t)]
        return self._digests

    def key(self) -> tuple:
        """What the prompt's cache depends on besides the token ids: the span (kind, grid, seconds per temporal
        patch: positions) and the pixels."""
        s = self.span
        return (s.kind, tuple(int(x) for x in s.grid_thw), float(s.seconds_per_grid), *self.patch_digests())

    def describe(self, cfg) -> dict:
        """What the model was given: kind, frames, frame size [height, width] after resizing, tokens."""
        _, gh, gw = self.span.grid_thw
        p = cfg.vision.patch_size
        return {"kind": self.span.kind, "frames": self.frames, "frame_size": [gh * p, gw * p], "tokens": self.tokens}

    def prompt_entry(self, cfg) -> tuple:
        """What ``models.prompt.prompt_ids`` takes for this visual: (kind, tokens[, timestamps])."""
        if self.timestamps is not None and family(cfg.model_type).VIDEO_TIMESTAMPS:
            return self.span.kind, self.tokens, self.timestamps
        return self.span.kind, self.tokens


@dataclass
class Prompt:
    ids: list[int]
    positions: torch.Tensor  # [3, S]
    next_position: int
    visuals: list[Visual]
    video_token_index: torch.Tensor  # cache indices of video (and image) tokens


def digest(t: torch.Tensor) -> bytes:
    """A 16-byte content digest of a tensor's bytes (with its shape and dtype)."""
    a = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype}{tuple(a.shape)}".encode())
    h.update(a.view(torch.uint8).numpy().data if a.numel() else b"")
    return h.digest()


def visual_from(cfg, settings: VisionSettings, *, video: str | Path | None = None, frames=None,
                image=None, fps: float = 2.0, max_frames: int | None = None, color_order: str = "rgb",
                frames_fps: float | None = None, max_patches: int | None = None) -> Visual | None:
    """Exactly one of video (file), frames (folder or list of arrays) or image (file or array).

    Frames: with ``frames_fps`` (the rate they were captured at), they are sampled like a video file at
    ``settings.fps`` within the frame limits; without it, each frame is taken as one sample ``1 / fps`` seconds
    after the previous, and more than ``max_frames`` are thinned evenly to ``max_frames``. An input of more than
    ``max_patches`` patches is refused before anything is resized.
    Arrays from the caller are uint8 [H, W, 3] in ``color_order``: "rgb" (default) or "bgr" (as OpenCV
    decodes); files are decoded here and need no flag.
    """
    given = [x is not None for x in (video, frames, image)]
    if sum(given) > 1:
        raise InputError("give one visual input: a video, frames or an image")
    if color_order not in ("rgb", "bgr"):
        raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")

    def to_rgb(a, what):
        a = check_frame(a, what)
        return np.ascontiguousarray(a[:, :, ::-1]) if color_order == "bgr" else a

    v = cfg.vision
    times = None
    count = 1
    if video is not None:
        decoded, sample_fps, times = read_video_timed(video, settings, max_frames, max_patches)
        pv, grid = process_video(decoded, settings, resized=True)
        count = len(decoded)
        span = VisualSpan("video", grid, v.temporal_patch_size / sample_fps)
    elif frames is not None:
        folder = isinstance(frames, (str, Path))
        if folder:  # image files: only the sampled ones are read, each resized as soon as it is read
            frames = frame_files(frames)
        else:
            frames = [to_rgb(f, f"frame {i}") for i, f in enumerate(frames)]
        if not frames:
            raise InputError("the frame list is empty")
        if fps <= 0:
            raise InputError(f"fps must be > 0, got {fps}")
        if frames_fps is not None:  # captured at frames_fps: sampled as a video file is
            taken = sample_indices(len(frames), frames_fps, settings, max_frames).tolist()
            times = [i / frames_fps for i in taken]
            rate = len(taken) / len(frames) * frames_fps
        else:  # already sampled at fps
            taken = list(range(len(frames)))
            if max_frames and len(frames) > max_frames:
                tp = v.temporal_patch_size
                n = max(1, max_frames // tp * tp)
                taken = np.round(np.linspace(0, len(frames) - 1, n)).astype(int).tolist()
            times = [i / fps for i in taken]
            rate = len(taken) / len(frames) * fps
        frames = [frames[i] for i in taken]
        if folder:
            frames = read_resized(frames, settings, max_patches)
        pv, grid = process_video(frames, settings, resized=folder, max_patches=max_patches)
        count = len(frames)
        span = VisualSpan("video", grid, v.temporal_patch_size / rate)
    elif image is not None:
        arr = read_image(image) if isinstance(image, (str, Path)) else to_rgb(np.asarray(image), "image")
        pv, grid = process_image(arr, settings, max_patches)
        span = VisualSpan("image", grid)
    else:
        return None
    idx = family(cfg.model_type).vision_inputs(grid, v)
    tokens = grid[0] * grid[1] * grid[2] // v.spatial_merge_size**2
    stamps = None if times is None else patch_timestamps(times, v.temporal_patch_size)
    return Visual(span, torch.from_numpy(pv), idx, tokens, stamps, count)


PIXEL_OPTIONS = ("video_min_pixels", "video_max_pixels", "video_total_pixels", "image_min_pixels", "image_max_pixels")
_PIXEL_HELP = {
    "video_min_pixels": "fewest pixels per video frame",
    "video_max_pixels": "most pixels per video frame (fewer: fewer vision tokens, a shorter prefill, less detail)",
    "video_total_pixels": "pixel budget over all frames of a video (per frame: at most total / frames * 2)",
    "image_min_pixels": "fewest pixels of an image",
    "image_max_pixels": "most pixels of an image",
}


def add_pixel_arguments(ap, defaults: dict | None = None, default_note: str = "the checkpoint's processor setting"):
    """``--video-min-pixels`` ... ``--image-max-pixels`` (see ``VisionSettings.with_budget``); the help names
    each default (``defaults``: per-option notes, e.g. a protocol's values)."""
    for name in PIXEL_OPTIONS:
        note = (defaults or {}).get(name, default_note)
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"{_PIXEL_HELP[name]} (default: {note})")


def pixel_budget(args) -> dict:
    """The pixel options a CLI was given (None where not given)."""
    return {name: getattr(args, name) for name in PIXEL_OPTIONS}


def build_prompt(cfg, token_ids: list[int], visuals: list[Visual]) -> Prompt:
    positions, nxt = family(cfg.model_type).prompt_positions(cfg, token_ids, [v.span for v in visuals])
    ids = torch.tensor(token_ids)
    index = torch.nonzero((ids == cfg.video_token_id) | (ids == cfg.image_token_id)).view(-1)
    return Prompt(token_ids, positions, nxt, visuals, index)
