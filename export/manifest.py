"""manifest.json: the one schema an export directory is described by, written by export, read by runtime.

format_version bumps whenever the graph contract or the layout of the directory changes; the runtime
refuses directories of another version with a message saying to re-export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from models.errors import UserError

# 2: the trunk takes cache_length (static-shape decode over a fixed-capacity cache)
# 3: weight-only quantized exports (``quantization`` entry; quantized trunk graph and head.safetensors)
# 4: graph weights named after their modules (the torch backend runs from the export alone)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "model_type", "config", "precision", "limits", "graphs", "files",
                 "validation", "tensorrt_compat", "quantization", "tools")
GRAPHS = ("vision", "trunk")


class ExportError(UserError):
    """An export cannot be made, or an export directory is missing, incomplete or tampered with."""


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the directory except the manifest itself."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    data = dict(data, format_version=FORMAT_VERSION, files=file_entries(root))
    (root / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False))


def read_manifest(root: str | Path) -> dict[str, Any]:
    d = Path(root).expanduser()
    if not d.is_dir():
        raise ExportError(f"engine directory {d} does not exist; "
                          f"create it with `python -m export --model ... --out {d}`")
    f = d / MANIFEST
    if not f.is_file():
        raise ExportError(f"{d} has no {MANIFEST}: it is not a complete export; re-run `python -m export`")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{f} is not valid JSON ({e}); re-run `python -m export`") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{d} was exported in format version {version}, this software reads version "
                          f"{FORMAT_VERSION}; re-export it with `python -m export --force`")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ExportError(f"{f} lacks the fields {', '.join(missing)}; re-export it")
    return data


def weight_format(data: dict[str, Any]) -> dict[str, Any]:
    """How an export stores its weights: the precision and the quantization scheme (a Result's config shows it)."""
    q = data.get("quantization", {})
    out = {"precision": data["precision"], "quantize": q.get("scheme", "none")}
    if out["quantize"] != "none":
        out.update(method=q["method"], block_size=q["block_size"], trunk_form=q["trunk_form"])
    return out


def check_export(root: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Verify a directory: manifest schema, files present, hashes, graph I/O equal to the contract.

    Raises one ExportError listing every problem; returns the manifest when all is well.
    """
    import onnx

    from models.registry import SUPPORTED
    d = Path(root).expanduser()
    data = read_manifest(d)
    problems: list[str] = []
    if data["model_type"] not in SUPPORTED:
        problems.append(f"model_type {data['model_type']!r} is not supported by this software")
    for name, entry in data["files"].items():
        p = d / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: size {p.stat().st_size} != {entry['bytes']} recorded (tampered or truncated)")
        elif verify_hashes and sha256(p) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (tampered or corrupted)")
    for graph in GRAPHS:
        onnx_file = d / f"{graph}.onnx"
        if not onnx_file.is_file():
            if f"{graph}.onnx" not in data["files"]:
                problems.append(f"{graph}.onnx: missing")
            continue
        want = data["graphs"].get(graph, {})
        try:
            m = onnx.load(str(onnx_file), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and others
            problems.append(f"{graph}.onnx: not a readable ONNX file ({e})")
            continue
        got = graph_io(m)
        for side in ("inputs", "outputs"):
            if got[side] != want.get(side):
                problems.append(f"{graph}.onnx: {side} differ from the contract in the manifest")
        contract = _contract(data, graph)
        if contract is not None and [t["name"] for t in got["inputs"]] != contract[0]:
            problems.append(f"{graph}.onnx: input names differ from the graph contract {contract[0]}")
        if contract is not None and [t["name"] for t in got["outputs"]] != contract[1]:
            problems.append(f"{graph}.onnx: output names differ from the graph contract {contract[1]}")
    if problems:
        raise ExportError(f"{d} failed the check: " + "; ".join(problems))
    return data


def _contract(data: dict[str, Any], graph: str) -> tuple[list[str], list[str]] | None:
    from models.registry import SUPPORTED, family

    if data["model_type"] not in SUPPORTED:
        return None
    return family(data["model_type"]).graph_contract(data["config"], graph)


def graph_io(model) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (dim names for dynamic axes) of a graph's inputs and outputs."""
    import onnx

    def describe(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [describe(v) for v in model.graph.input if v.name not in inits],
            "outputs": [describe(v) for v in model.graph.output]}
