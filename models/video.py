"""Decoding videos, image files and frame folders with OpenCV, streaming: only sampled frames are kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.errors import InputError
from models.preprocess import VisionSettings, sample_indices

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _cv2():
    # FFmpeg inside OpenCV prints its own complaints ("moov atom not found") to stderr; the errors raised
    # here say the same in one line
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2
    except ImportError:
        raise InputError("OpenCV (cv2) is not importable; install opencv-python-headless "
                         "(on Jetson, the JetPack OpenCV works)") from None
    return cv2


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; pass a file (or use --frames for a folder of images)")
    if p.stat().st_size == 0:
        raise InputError(f"{what} {p} is empty (0 bytes)")
    return p


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]."""
    cv2 = _cv2()
    p = _existing_file(path, "image")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"image {p} could not be decoded; is it a JPEG/PNG/BMP/WebP/TIFF image?")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_frames_dir(path: str | Path) -> list[np.ndarray]:
    """Every image in a folder, in name order, as RGB frames (no sampling)."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise InputError(f"frames folder {d} does not exist or is not a folder")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"frames folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [read_image(f) for f in files]


def read_video(path: str | Path, s: VisionSettings, max_frames: int | None = None) -> tuple[list[np.ndarray], float]:
    """Sampled RGB frames of a video file and the rate they were sampled at (frames per second)."""
    frames, sample_fps, _ = read_video_timed(path, s, max_frames)
    return frames, sample_fps


def read_video_timed(path: str | Path, s: VisionSettings,
                     max_frames: int | None = None) -> tuple[list[np.ndarray], float, list[float]]:
    """Sampled RGB frames of a video file, the rate they were sampled at (frames per second) and each frame's
    time in the video (seconds).

    Frames are decoded in order and only the sampled ones are converted and kept, so a long video is
    never held in memory whole.
    """
    cv2 = _cv2()
    p = _existing_file(path, "video")
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise InputError(f"video {p} could not be opened; is it a video file OpenCV can decode?")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if total < 1:
            raise InputError(f"video {p} has no frames OpenCV can read (not a video, or truncated)")
        if not (0 < fps < 1000):
            fps = 30.0  # container without a usable rate: assume a common one
        wanted = sample_indices(total, fps, s, max_frames)
        keep: list[np.ndarray] = []
        targets = iter(sorted(set(wanted.tolist())))
        nxt = next(targets, None)
        i = 0
        while nxt is not None:
            if not cap.grab():
                break  # container claimed more frames than it holds
            if i == nxt:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                keep.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                nxt = next(targets, None)
            i += 1
    finally:
        cap.release()
    if not keep:
        raise InputError(f"video {p} could not be decoded (no frame read); the file may be truncated or not a video")
    # repeated indices (very short videos) are kept as repeats, as the sampling asked for
    by_index = dict(zip(sorted(set(wanted.tolist()))[: len(keep)], keep))
    taken = [j for j in wanted.tolist() if j in by_index]
    frames = [by_index[j] for j in taken]
    sample_fps = len(frames) / total * fps
    return frames, sample_fps, [j / fps for j in taken]
