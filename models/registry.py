"""model_type -> model family.

Each family module exposes what export and runtime need of it, and nothing else is model-specific:
``Config`` (from_dict / from_stored / to_dict), ``Model``, ``load_model``, ``load_head``, ``export_spec``,
``TrunkGraph``, ``graph_contract`` (graph input/output names for a stored config), ``vision_inputs`` (the vision
graph's index inputs for a grid), ``prompt_positions`` (M-RoPE ids of a prompt), ``VIDEO_TIMESTAMPS`` (whether
video prompts carry "<t seconds>" before each frame), ``FRAME_LOCAL_VISION`` (whether a temporal patch's vision
features depend on its own pixels alone, so that they can be reused), ``LINEARS`` / ``HEAD_LINEARS`` (what weight-only
quantization quantizes); optionally ``trt_vision_shapes`` (the vision graph's TensorRT profile, where its inputs
differ from Qwen2.5-VL's).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from models.checkpoint import read_config
from models.errors import CheckpointError

SUPPORTED = {"qwen2_5_vl": "models.qwen2_5_vl", "qwen3_vl": "models.qwen3_vl"}
NOT_YET = {"qwen3_vl_moe": "the Qwen3-VL mixture-of-experts models are not supported yet (dense Qwen3-VL is)"}


def family(model_type: str) -> ModuleType:
    """The family module of a supported ``model_type`` (as a manifest stores it)."""
    if model_type not in SUPPORTED:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported model types: "
                              f"{', '.join(sorted(SUPPORTED))}")
    return importlib.import_module(SUPPORTED[model_type])


def family_for(path: str | Path) -> ModuleType:
    raw = read_config(path)
    mt = raw.get("model_type")
    if mt in NOT_YET:
        raise CheckpointError(f"{path}: model_type {mt!r}: {NOT_YET[mt]}; supported model types: "
                              f"{', '.join(sorted(SUPPORTED))}")
    if mt not in SUPPORTED:
        archs = ", ".join(raw.get("architectures") or []) or "unknown"
        raise CheckpointError(
            f"{path}: model_type {mt!r} (architectures: {archs}) is not supported; "
            f"supported model types: {', '.join(sorted(SUPPORTED))}"
        )
    return importlib.import_module(SUPPORTED[mt])


def load_config(path: str | Path):
    return family_for(path).Config.from_dict(read_config(path))


def load_model(path: str | Path, dtype="fp32", device="cpu"):
    """Load a supported checkpoint from disk (safetensors only; never runs code from the directory)."""
    return family_for(path).load_model(path, dtype=dtype, device=device)
