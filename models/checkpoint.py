"""Reading a Hugging Face checkpoint directory from disk: config and safetensors weights only.

Nothing here executes code from the directory: no ``trust_remote_code``, no pickle (``.bin``) weights.
Weights are streamed one tensor at a time so that loading a 7B model does not hold two copies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from models.checks import plain_name, read_json_object
from models.errors import CheckpointError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"unknown precision {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def checkpoint_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint directory {p} does not exist; pass the folder holding config.json")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory; pass the checkpoint folder holding config.json")
    return p


def confined(d: Path, name: str) -> Path:
    """The file ``name`` of checkpoint folder ``d``, refused (CheckpointError) unless it is a plain name and the file,
    after links are followed, lies inside the folder, or inside the ``blobs`` folder of a Hugging Face cache repo
    when ``d`` is one of its ``snapshots`` (whose files are links into ``blobs``). A checkpoint's link to a file
    elsewhere is never read, so nothing outside it reaches an export."""
    if not plain_name(name):
        raise CheckpointError(f"{d}: {name!r} is not a plain file name inside the checkpoint folder (refused)")
    p = d / name
    if not p.is_symlink():
        return p
    real, root = p.resolve(), d.resolve()
    allowed = [root]
    if d.parent.name == "snapshots":
        allowed.append((d.parent.parent / "blobs").resolve())
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{p} is a link to {real}, outside the checkpoint folder (refused: only the "
                              "checkpoint's own files are read)")
    return p


def read_config(path: str | Path) -> dict[str, Any]:
    p = confined(checkpoint_dir(path), "config.json")
    if not p.is_file():
        raise CheckpointError(f"{p.parent} has no config.json; is it a Hugging Face checkpoint directory?")
    return read_json_object(p, CheckpointError)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the shard index when there is one."""
    d = checkpoint_dir(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(confined(d, index.name).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = [confined(d, s) for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{d}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [confined(d, single.name)]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise CheckpointError(
            f"{d} has only pickle weights (.bin/.pt); they can execute code when loaded and are refused. "
            "Convert them to safetensors first (for example save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{d} has no model.safetensors or model.safetensors.index.json")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yields (name, lazy slice handle getter) over every tensor in the checkpoint, one file at a time."""
    from safetensors import SafetensorError, safe_open

    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None
