"""Interchangeable backends for the vision encoder and the decoder trunk.

| backend | device | module |
|---|---|---|
| `trt`   | NVIDIA GPU / Jetson | `runtime.backends.trt` (TensorRT engines; torch owns buffers and stream) |
| `ort`   | CPU (CUDA with onnxruntime-gpu) | `runtime.backends.ort` (IO binding into the cache) |
| `torch` | any | `runtime.backends.torch_ref` (PyTorch modules: the parity reference) |

Every backend is a ``runtime.backends.base.Backend``: ``encode_vision(inputs) -> embeds``, ``trunk(embeds,
positions, cache) -> hidden`` (the trunk's new cache entries written in place) and ``trunk_step`` for static decode,
and what it can do declared as attributes (``BackendBase`` holds the defaults).
"""

from __future__ import annotations

from pathlib import Path

from models.errors import UserError

BACKENDS = ("auto", "trt", "ort", "torch")


def tensorrt_usable(engine_dir: Path) -> tuple[bool, str]:
    """Whether the trt backend can run here, and why (not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to PyTorch"
    missing = [p for p in ("trunk.plan", "vision.plan") if not (engine_dir / p).is_file()]
    if missing:
        return False, f"the export has no TensorRT engines ({', '.join(missing)}; export with --tensorrt)"
    return True, "tensorrt and a CUDA GPU are available and the export has engines"


def resolve(name: str, engine_dir: Path) -> tuple[str, str]:
    """(backend name, reason) for a requested backend name; 'auto' picks trt when usable, else ort."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    ok, why = tensorrt_usable(engine_dir)
    if name == "auto":
        return ("trt", why) if ok else ("ort", f"ONNX Runtime fallback: {why}")
    if name == "trt" and not ok:
        raise UserError(f"--backend trt is not usable here: {why}")
    return name, "requested"
