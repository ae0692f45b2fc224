"""manifest.json: the one schema an export directory is described by, written by export, read by runtime.

format_version bumps whenever the graph contract or the layout of the directory changes; the runtime
refuses directories of another version with a message saying to re-export.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from models.checks import plain_name, read_json_object
from models.errors import UserError

# 2: the trunk takes cache_length (static-shape decode over a fixed-capacity cache)
# 3: weight-only quantized exports (``quantization`` entry; quantized trunk graph and head.safetensors)
# 4: graph weights named after their modules (the torch backend runs from the export alone)
# 5: the trunk's cache_length is per row ([B]): requests of different lengths decode in one call
FORMAT_VERSION = 5
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format_version", "model_type", "config", "precision", "limits", "graphs", "files",
                 "validation", "tensorrt_compat", "quantization", "tools")
GRAPHS = ("vision", "trunk")
# every file in an export folder the runtime may open (besides the manifest and the graphs' external data): each
# one present must be listed in the manifest with its hash
READ_BY_RUNTIME = ("vision.onnx", "trunk.onnx", "head.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "vision.plan", "trunk.plan", "config.json",
                   "generation_config.json")
# limits no export of a supported model needs more of (a manifest asking for more is refused before any allocation)
LIMIT_CEILINGS = {"max_context": 1 << 20, "max_prompt": 1 << 20, "max_frames": 4096, "max_vision_patches": 1 << 24,
                  "max_frame_patches": 1 << 20, "max_batch": 64}


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


def regular_file(path: Path) -> str | None:
    """None when ``path`` is a regular file (not a symlink, not special), else what it is."""
    import stat

    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link (refused: an export holds its own files)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (refused)"
    return None


def read_manifest(root: str | Path) -> dict[str, Any]:
    d = Path(root).expanduser()
    if not d.is_dir():
        raise ExportError(f"engine directory {d} does not exist; "
                          f"create it with `python -m export --model ... --out {d}`")
    f = d / MANIFEST
    if not f.exists() and not f.is_symlink():
        raise ExportError(f"{d} has no {MANIFEST}: it is not a complete export; re-run `python -m export`")
    what = regular_file(f)
    if what is not None:
        raise ExportError(f"{f} is {what}")
    data = read_json_object(f, ExportError, "; it is not a manifest this project wrote: re-run `python -m export`")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{d} was exported in format version {version}, this software reads version "
                          f"{FORMAT_VERSION}; re-export it with `python -m export --force`")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ExportError(f"{f} lacks the fields {', '.join(missing)}; re-export it")
    problems = schema_problems(data)
    if problems:
        raise ExportError(f"{f} is malformed: " + "; ".join(problems))
    from models.registry import SUPPORTED, family

    if data["model_type"] in SUPPORTED:  # every size and count in the config typed and in range before any use
        try:
            family(data["model_type"]).Config.from_stored(data["config"])
        except UserError as e:
            raise ExportError(f"{f}: {e}") from None
    return data


def schema_problems(data: dict[str, Any]) -> list[str]:
    """Types and ranges of the fields the runtime uses, before any of them is used."""
    problems = []
    for key, kind in (("model_type", str), ("precision", str), ("config", dict), ("limits", dict), ("graphs", dict),
                      ("files", dict), ("quantization", dict)):
        if not isinstance(data[key], kind):
            problems.append(f"{key} must be a JSON {'string' if kind is str else 'object'}")
    if problems:
        return problems
    for key, ceiling in LIMIT_CEILINGS.items():
        v = data["limits"].get(key)
        if key == "max_frame_patches" and v is None:
            continue
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= ceiling):
            problems.append(f"limits.{key} must be an integer in [1, {ceiling}], got {v!r}")
    for name, entry in data["files"].items():
        if not plain_name(name):
            problems.append(f"files: {name!r} is not a plain file name inside the folder (refused)")
        elif not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                  and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)
                  and entry["bytes"] >= 0):
            problems.append(f"files: {name!r} needs a sha256 string and a byte count")
    return problems


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
        what = regular_file(p)
        if what is not None:
            problems.append(f"{name}: {what}")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: size {p.stat().st_size} != {entry['bytes']} recorded (tampered or truncated)")
        elif verify_hashes and sha256(p) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (tampered or corrupted)")
    for name in READ_BY_RUNTIME:
        if name not in data["files"] and (os.path.lexists(d / name)):
            problems.append(f"{name}: in the folder but not in the manifest (added after export?); the runtime "
                            "would read it: remove it or re-export")
    for graph in GRAPHS:
        onnx_file = d / f"{graph}.onnx"
        if f"{graph}.onnx" not in data["files"]:
            problems.append(f"{graph}.onnx: missing")
            continue
        if regular_file(onnx_file) is not None:
            continue
        want = data["graphs"].get(graph, {})
        try:
            m = onnx.load(str(onnx_file), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and others
            problems.append(f"{graph}.onnx: not a readable ONNX file ({e})")
            continue
        for location in external_data(m):
            if not plain_name(location) or location not in data["files"]:
                problems.append(f"{graph}.onnx: external data {location!r} is not a file listed in the manifest "
                                "(refused: a graph reads only its own folder's files)")
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


def external_data(model) -> list[str]:
    """The external-data file names a graph's initializers point at."""
    import onnx

    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc not in out:
                out.append(loc)
    return out


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
