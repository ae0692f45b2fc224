"""Images and videos to ``pixel_values`` and ``grid_thw``, without torchvision.

Follows the original Qwen2-VL / Qwen2.5-VL processing: frames sampled by fps within min/max frame
counts, each frame resized (PIL bicubic, as the reference image processor does) to multiples of
patch_size x merge_size inside [min_pixels, max_pixels] (videos also inside a total-pixel budget),
rescaled, normalized, grouped by temporal_patch_size (the last frame repeated to fill a group) and
cut into flat patches in merged-block order.

Frames handed in by callers are RGB uint8 [H, W, 3] arrays (OpenCV's BGR must be converted first;
``runtime`` does that for files it decodes itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionSettings:
    """Processing parameters; read from the checkpoint's preprocessor_config.json where present."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # video sampling (the original release's defaults)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = 24576 * 28 * 28
    # whose video rules apply: "qwen2_5_vl" (per-frame bounds, a total budget) or "qwen3_vl" (its video
    # processor: video_min/max_pixels bound frames x height x width); set from video_preprocessor_config.json
    video_rule: str = "qwen2_5_vl"
    extra: dict = field(default_factory=dict)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def with_budget(self, fps: float | None = None, video_min_pixels: int | None = None,
                    video_max_pixels: int | None = None, video_total_pixels: int | None = None,
                    image_min_pixels: int | None = None, image_max_pixels: int | None = None) -> VisionSettings:
        """These settings with a caller's frame rate and pixel budget (None: unchanged): how a user trades
        accuracy for prefill time. Video pixel bounds given here follow qwen-vl-utils' per-frame rule (the
        Qwen2.5-VL processor's: each frame within [min, max(min(max, total / frames * 2), 1.05 * min)]),
        whatever the family's own video rule."""
        from dataclasses import replace

        from models.checks import check_number

        given = {"video_min_pixels": video_min_pixels, "video_max_pixels": video_max_pixels,
                 "video_total_pixels": video_total_pixels, "min_pixels": image_min_pixels,
                 "max_pixels": image_max_pixels}
        names = {"min_pixels": "image_min_pixels", "max_pixels": "image_max_pixels"}
        changes = {k: check_number(names.get(k, k), v, lo=1, integer=True) for k, v in given.items() if v is not None}
        if fps is not None:
            changes["fps"] = check_number("fps", fps, lo=0, lo_open=True, hi=1000)
        if any(k.startswith("video_") for k in changes):
            changes["video_rule"] = "qwen2_5_vl"
        out = replace(self, **changes)
        for lo, hi, what in ((out.video_min_pixels, out.video_max_pixels, "video"), (out.min_pixels, out.max_pixels,
                                                                                     "image")):
            if lo > hi:
                raise InputError(f"{what}_min_pixels {lo} is above {what}_max_pixels {hi}")
        return out

    @classmethod
    def from_dir(cls, path: str | Path) -> VisionSettings:
        s = cls()
        d = Path(path)
        from models.checks import read_json_object

        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            f = d / name
            if not f.is_file():
                continue
            raw = read_json_object(f, InputError)
            try:
                _read_settings(s, raw, name.startswith("video"))
            except (TypeError, ValueError, AttributeError) as e:
                raise InputError(f"{f} has a field of the wrong type or value ({e})") from None
        s.check()
        return s

    def check(self) -> None:
        """Numbers in range before any is used to resize or allocate."""
        from models.checks import check_number

        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"):
            check_number(key, getattr(self, key), lo=1, hi=1 << 16, integer=True)
        for key in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_total_pixels"):
            check_number(key, getattr(self, key), lo=1, hi=1 << 34, integer=True)
        check_number("fps", self.fps, lo=0, lo_open=True, hi=1000)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(
                isinstance(x, (int, float)) and x == x for x in (*self.image_mean, *self.image_std)) \
                or not all(x > 0 for x in self.image_std):
            raise InputError("image_mean and image_std must be 3 numbers each (std > 0)")


def _read_settings(s: VisionSettings, raw: dict, is_video: bool) -> None:
    """One processor config file's fields into ``s`` (converted; ranges are checked by ``VisionSettings.check``)."""
    size = raw.get("size") or {}
    lo = raw.get("min_pixels", size.get("shortest_edge"))
    hi = raw.get("max_pixels", size.get("longest_edge"))
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if key in raw:
            setattr(s, key, int(raw[key]))
    if is_video:
        if raw.get("video_processor_type") == "Qwen3VLVideoProcessor":
            s.video_rule = "qwen3_vl"
        if lo is not None:
            s.video_min_pixels = int(lo)
        if hi is not None:
            s.video_max_pixels = int(hi)
        for key in ("fps", "min_frames", "max_frames"):
            if raw.get(key) is not None:
                setattr(s, key, type(getattr(s, key))(raw[key]))
    else:
        if lo is not None:
            s.min_pixels = int(lo)
        if hi is not None:
            s.max_pixels = int(hi)
        s.image_mean = tuple(float(x) for x in raw.get("image_mean", s.image_mean))
        s.image_std = tuple(float(x) for x in raw.get("image_std", s.image_std))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target size: multiples of ``factor``, pixel count inside [min, max], aspect ratio kept."""
    if min(height, width) < 1:
        raise InputError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"aspect ratio {width}x{height} is beyond 200:1; crop the image first")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar * w_bar > max_pixels:
        # very elongated inputs: the short side is clamped up to one factor, so the reference rule can
        # overshoot max_pixels; trim the long side to stay within the budget (a deliberate deviation that
        # applies only where the reference would exceed it)
        if h_bar >= w_bar:
            h_bar = max(factor, max_pixels // w_bar // factor * factor)
        else:
            w_bar = max(factor, max_pixels // h_bar // factor * factor)
    return h_bar, w_bar


def check_frame(frame: np.ndarray, what: str = "frame") -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"{what} must be an RGB uint8 array of shape [H, W, 3]; got {a.dtype} {list(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{what} is empty ({list(a.shape)})")
    return a


def resize_normalize(frame: np.ndarray, height: int, width: int, s: VisionSettings) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> normalized float32 [3, height, width] (PIL bicubic, like the reference)."""
    from PIL import Image

    img = Image.fromarray(frame, mode="RGB") if frame.shape[:2] != (height, width) else None
    a = np.asarray(img.resize((width, height), resample=Image.BICUBIC)) if img is not None else frame
    x = a.astype(np.float64) * (1 / 255)
    x = (x.astype(np.float32) - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    return x.transpose(2, 0, 1)


def patchify(frames: np.ndarray, s: VisionSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[F, 3, H, W] normalized frames -> pixel_values [t*h*w, 3*tp*p*p] and grid (t, h, w)."""
    tp, p, m = s.temporal_patch_size, s.patch_size, s.merge_size
    if pad := -frames.shape[0] % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    f, c, hh, ww = frames.shape
    t, gh, gw = f // tp, hh // p, ww // p
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t * gh * gw, c * tp * p * p)), (t, gh, gw)


def check_patches(frames: int, height: int, width: int, s: VisionSettings, max_patches: int | None) -> None:
    """Refuse, before anything is resized, a visual input whose patches would exceed ``max_patches``."""
    if max_patches is None:
        return
    n = -(-frames // s.temporal_patch_size) * (height // s.patch_size) * (width // s.patch_size)
    if n > max_patches:
        raise InputError(f"the visual input has {n} patches, this export takes at most {max_patches}; use fewer "
                         "frames or fewer pixels (video_max_pixels / image_max_pixels), or re-export with a larger "
                         "--max-vision-patches")


def process_image(image: np.ndarray, s: VisionSettings,
                  max_patches: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    frame = check_frame(image, "image")
    h, w = smart_resize(frame.shape[0], frame.shape[1], s.factor, s.min_pixels, s.max_pixels)
    check_patches(1, h, w, s, max_patches)
    return patchify(resize_normalize(frame, h, w, s)[None], s)


def video_frame_size(height: int, width: int, n_frames: int, s: VisionSettings) -> tuple[int, int]:
    """Per-frame target size for a video: per-frame bounds and the total-pixel budget over all frames."""
    if s.video_rule == "qwen3_vl":
        from models.qwen3_vl.preprocess import frame_size

        return frame_size(n_frames, height, width, s.factor, s.temporal_patch_size, s.video_min_pixels,
                          s.video_max_pixels)
    max_pixels = max(min(s.video_max_pixels, s.video_total_pixels / max(n_frames, 1) * s.temporal_patch_size),
                     int(s.video_min_pixels * 1.05))
    return smart_resize(height, width, s.factor, s.video_min_pixels, int(max_pixels))


def process_video(frames: Iterable[np.ndarray], s: VisionSettings, resized: bool = False,
                  max_patches: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Sampled RGB frames (all the same size) -> pixel_values and grid (t, h, w). ``resized``: the frames are
    already at their target size (``read_video_timed`` resizes while decoding)."""
    frames = [check_frame(f, f"video frame {i}") for i, f in enumerate(frames)]
    if not frames:
        raise InputError("the video has no frames")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise InputError(f"video frames differ in size ({sorted(shapes)}); give frames of one size")
    h, w = frames[0].shape[:2] if resized else video_frame_size(frames[0].shape[0], frames[0].shape[1], len(frames), s)
    check_patches(len(frames), h, w, s, max_patches)
    return patchify(np.stack([resize_normalize(f, h, w, s) for f in frames]), s)


def resize_rgb(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 resized exactly as ``resize_normalize`` resizes (PIL bicubic), still uint8."""
    from PIL import Image

    if frame.shape[:2] == (height, width):
        return frame
    frame = np.ascontiguousarray(frame)
    src = Image.frombuffer("RGB", (frame.shape[1], frame.shape[0]), frame, "raw", "RGB", 0, 1)  # no copy
    return np.asarray(src.resize((width, height), resample=Image.BICUBIC))


def sample_indices(total_frames: int, video_fps: float, s: VisionSettings,
                   max_frames: int | None = None) -> np.ndarray:
    """Which frames to decode: ``fps`` per second within [min_frames, max_frames], a multiple of the
    temporal patch size, spread evenly from the first to the last frame (original release's rule)."""
    if s.video_rule == "qwen3_vl":
        from models.qwen3_vl import preprocess

        return preprocess.sample_indices(total_frames, video_fps, s.fps, s.min_frames,
                                         min(s.max_frames, max_frames or s.max_frames))
    if total_frames < 1:
        raise InputError("the video has no frames")
    f = s.temporal_patch_size
    cap = min(s.max_frames, max_frames or s.max_frames, total_frames)
    lo = math.ceil(s.min_frames / f) * f
    hi = max(f, math.floor(cap / f) * f)
    n = total_frames / max(video_fps, 1e-6) * s.fps
    n = min(max(n, lo), hi, total_frames)
    n = max(1, math.floor(n / f) * f) if n >= f else max(1, int(n))
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def patch_timestamps(frame_times: list[float], temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time (the last frame repeated to
    fill the final patch, as the patches themselves are)."""
    times = list(frame_times)
    if pad := -len(times) % temporal_patch_size:
        times += [times[-1]] * pad
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]
