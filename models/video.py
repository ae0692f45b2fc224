"""Decoding videos, image files and frame folders with OpenCV, streaming: only sampled frames are kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.errors import InputError
from models.preprocess import VisionSettings, check_patches, resize_rgb, sample_indices, video_frame_size

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


def frame_files(path: str | Path) -> list[Path]:
    """The images of a frames folder, in name order."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise InputError(f"frames folder {d} does not exist or is not a folder")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"frames folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_frames_dir(path: str | Path) -> list[np.ndarray]:
    """Every image in a folder, in name order, as RGB frames (no sampling)."""
    return [read_image(f) for f in frame_files(path)]


def read_resized(files: list[Path], s: VisionSettings, max_patches: int | None = None) -> list[np.ndarray]:
    """Image files as the frames of one video, each resized to the processor's target size as soon as it is read
    (the size the first frame and the frame count give); frames of another size are refused."""
    out: list[np.ndarray] = []
    target = first = None
    for f in files:
        rgb = read_image(f)
        if first is None:
            first = rgb.shape
            target = video_frame_size(rgb.shape[0], rgb.shape[1], len(files), s)
            check_patches(len(files), *target, s, max_patches)
        elif rgb.shape != first:
            raise InputError(f"video frames differ in size ({first[1]}x{first[0]} and {rgb.shape[1]}x{rgb.shape[0]} "
                             f"at {f.name}); give frames of one size")
        out.append(resize_rgb(rgb, *target))
    return out


def read_video(path: str | Path, s: VisionSettings, max_frames: int | None = None) -> tuple[list[np.ndarray], float]:
    """Sampled RGB frames of a video file and the rate they were sampled at (frames per second)."""
    frames, sample_fps, _ = read_video_timed(path, s, max_frames)
    return frames, sample_fps


def read_video_timed(path: str | Path, s: VisionSettings, max_frames: int | None = None,
                     max_patches: int | None = None) -> tuple[list[np.ndarray], float, list[float]]:
    """Sampled RGB frames of a video file, already resized to the processor's target size, the rate they were
    sampled at (frames per second) and each frame's time in the video (seconds).

    Frames are decoded in order and only the sampled ones are converted, resized and kept, so neither a long
    video nor a high resolution is ever held whole: memory is the sampled frames at their target size plus
    one decoded frame. A video whose patches would exceed ``max_patches`` is refused before decoding.
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
        height, width = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        target = video_frame_size(height, width, len(wanted), s) if height > 0 and width > 0 else None
        if target is not None:
            check_patches(len(wanted), *target, s, max_patches)
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
                if target is None or bgr.shape[:2] != (height, width):  # the container's size was missing or wrong
                    height, width = bgr.shape[:2]
                    target = video_frame_size(height, width, len(wanted), s)
                    check_patches(len(wanted), *target, s, max_patches)
                    keep = [resize_rgb(f, *target) for f in keep]
                # resized first, channels swapped after: bicubic works per channel, so this is the same frame,
                # and no full-size RGB copy is ever made
                keep.append(np.ascontiguousarray(resize_rgb(bgr, *target)[:, :, ::-1]))
                del bgr
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
