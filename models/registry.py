"""model_type -> model family. Each family module exposes ``Config``, ``load_model`` and ``export_spec``."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from models.checkpoint import read_config
from models.errors import CheckpointError

SUPPORTED = {"qwen2_5_vl": "models.qwen2_5_vl"}


def family_for(path: str | Path) -> ModuleType:
    raw = read_config(path)
    mt = raw.get("model_type")
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
