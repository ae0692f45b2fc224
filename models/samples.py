"""Small generated videos of moving shapes (OpenCV-written mp4), for tests, demos and the sample eval set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import InputError

COLORS = {"red": (0, 0, 255), "green": (0, 200, 0), "blue": (255, 0, 0), "yellow": (0, 220, 220)}  # BGR
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render_frames(shape: str = "circle", color: str = "red", direction: str = "right", frames: int = 16,
                  size: tuple[int, int] = (96, 128), seed: int = 0) -> list[np.ndarray]:
    """BGR uint8 frames of one shape moving across a noisy gray background."""
    import cv2

    h, w = size
    rng = np.random.default_rng(seed)
    background = (rng.normal(128, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    dx, dy = DIRECTIONS[direction]
    r = max(4, min(h, w) // 8)
    x0 = w // 2 - dx * (w // 3)
    y0 = h // 2 - dy * (h // 3)
    out = []
    for i in range(frames):
        f = i / max(frames - 1, 1)
        cx = int(x0 + dx * f * 2 * (w // 3))
        cy = int(y0 + dy * f * 2 * (h // 3))
        img = background.copy()
        if shape == "circle":
            cv2.circle(img, (cx, cy), r, COLORS[color], -1)
        elif shape == "square":
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), COLORS[color], -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(img, [pts], COLORS[color])
        out.append(img)
    return out


def write_video(path: str | Path, frames_bgr: list[np.ndarray], fps: float = 8.0) -> Path:
    import cv2

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames_bgr[0].shape[:2]
    writer = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise InputError(f"OpenCV cannot write {p} (no mp4v encoder in this OpenCV build)")
    try:
        for f in frames_bgr:
            writer.write(f)
    finally:
        writer.release()
    return p


def sample_video(path: str | Path, shape: str = "circle", color: str = "red", direction: str = "right",
                 seconds: float = 2.0, fps: float = 8.0, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Write an mp4 of a ``color`` ``shape`` moving ``direction``; returns its path."""
    frames = render_frames(shape, color, direction, max(1, int(round(seconds * fps))), size, seed)
    return write_video(path, frames, fps)
