"""``export_model``: checkpoint directory -> export directory (graphs, head, tokenizer, manifest).

The output appears only when complete: everything is written to a hidden sibling directory that is
renamed into place at the end and removed on any failure or interrupt.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from export.calibration import table as calibration_table
from export.graph_weights import name_graph_weights, record_weight_aliases
from export.manifest import ExportError, graph_io, write_manifest
from export.onnx_graphs import export_graph, name_dynamic_dims
from export.quantize import (
    Quantization,
    executed_ops,
    load_trunk_weights,
    quantize_head,
    quantize_trunk,
    trunk_weights,
)
from export.trt_compat import check_graph
from models.checkpoint import confined, read_config, resolve_dtype
from models.errors import UserError
from models.preprocess import VisionSettings
from models.registry import family_for

CARRIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json")
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in <graph>.onnx.data
# the trunk always does: the ort backend's fused form of it (runtime/backends/ort_trunk.py) then reads its
# weights from the file as the exported graph does, where with weights inside the graph it would hold more
# memory (measured on the bench export's int4 trunk: 688 MB resident against 637 MB, 1133 MB at the load peak)
EXTERNAL_DATA_GRAPHS = ("trunk",)


@dataclass
class Limits:
    max_context: int = 8192  # prompt + generated tokens
    max_prompt: int = 6144
    max_frames: int = 32
    max_vision_patches: int = 0  # 0: derived from max_frames and the processor's pixel bounds
    max_frame_patches: int = 0
    max_batch: int = 8  # requests a TensorRT decode call takes at once (its decode profile's batch range)

    def __post_init__(self) -> None:
        from models.checks import check_number

        self.max_context = check_number("--max-context", self.max_context, lo=2, integer=True)
        self.max_prompt = check_number("--max-prompt", self.max_prompt, lo=1, hi=self.max_context - 1, integer=True)
        self.max_frames = check_number("--max-frames", self.max_frames, lo=1, integer=True)
        self.max_vision_patches = check_number("--max-vision-patches (0: derived)", self.max_vision_patches, lo=0,
                                               integer=True)
        self.max_frame_patches = check_number("max_frame_patches", self.max_frame_patches, lo=0, integer=True)
        self.max_batch = check_number("--max-batch", self.max_batch, lo=1, hi=64, integer=True)


class Stages:
    """One line per stage on stderr with its duration: the progress of a long export."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.n, self.quiet = total, 0, quiet

    @contextmanager
    def stage(self, what: str):
        self.n += 1
        t = time.perf_counter()
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {what}: done in {time.perf_counter() - t:.1f} s", file=sys.stderr,
                  flush=True)


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    v = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript
        v["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return v


def derive_limits(limits: Limits, settings: VisionSettings, patch: int, merge: int) -> Limits:
    unit = merge * merge
    video_frame = settings.video_max_pixels
    if settings.video_rule == "qwen3_vl":  # its video budget bounds frames x pixels, and a video has >= 2 frames
        video_frame //= settings.temporal_patch_size
    per_frame = max(settings.max_pixels, video_frame) // (patch * patch)
    per_frame -= per_frame % unit
    total = per_frame * max(1, limits.max_frames // 2)
    if settings.video_rule == "qwen3_vl":  # no visual input exceeds an image or the whole video budget (its
        # temporal patches never outnumber the rounded frame count the budget is checked with, halved)
        budget = max(settings.max_pixels, settings.video_max_pixels) // (patch * patch)
        total = min(total, budget - budget % unit)
    lim = Limits(**asdict(limits))
    lim.max_frame_patches = lim.max_frame_patches or per_frame
    lim.max_vision_patches = lim.max_vision_patches or total
    if lim.max_prompt > lim.max_context:
        raise ExportError(f"--max-prompt {lim.max_prompt} exceeds --max-context {lim.max_context}")
    return lim


def replaceable(out: Path) -> None:
    """``--force`` replaces only an export made by this project (a folder with its manifest) or an empty folder."""
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; refusing to replace it")
    entries = list(out.iterdir())
    if not entries:
        return
    manifest = out / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and "format_version" in data and "graphs" in data and "files" in data):
        raise ExportError(f"--out {out} holds {len(entries)} entries and is not an export made by this project (no "
                          "manifest.json of one); --force replaces only an export or an empty folder: choose "
                          "another --out")


def export_model(model_dir: str | Path, out_dir: str | Path, precision: str = "fp32", limits: Limits | None = None,
                 opset: int = 18, device: str = "cpu", force: bool = False, validate: bool = True,
                 tensorrt: bool = False, quiet: bool = False, quantization: Quantization | None = None) -> Path:
    """Export a checkpoint; returns the export directory. Raises UserError subclasses for user mistakes.
    ``quantization``: weight-only int8/int4 of the decoder's linears (trunk graph and head) and the embedding."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() or out.is_symlink():
        replaceable(out)
    if opset > 20:
        raise ExportError(f"--opset {opset}: TensorRT 10.3 (JetPack 6) parses ONNX opsets up to 20")
    family = family_for(model_dir)  # fails early on a wrong directory or architecture
    for name in CARRIED_FILES:  # a link out of the checkpoint is refused before anything is read or written
        if os.path.lexists(Path(model_dir).expanduser() / name):
            confined(Path(model_dir).expanduser(), name)
    dtype = resolve_dtype(precision)
    quant = (quantization or Quantization()).resolve(family.Config.from_dict(read_config(model_dir)).text, precision,
                                                     tensorrt)
    if quant.scheme == "int4" and quant.block_size not in (32, 64, 128, 256) and not quiet:
        print(f"note: int4 in blocks of {quant.block_size} runs on ONNX Runtime only; the GPU path (--backend torch "
              "on CUDA) refuses it at load (its int4 kernel takes blocks of 32 to 256)", file=sys.stderr)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # load, 2 graphs, head, compat, manifest (+ quantize, validate, quantization error, TensorRT)
    stages = Stages(6 + int(quant.enabled) * (1 + int(validate)) + int(validate) + int(tensorrt), quiet)
    try:
        with stages.stage(f"load {model_dir} ({precision}, {device})"):
            model = family.load_model(model_dir, dtype=dtype, device=device)
            cfg = model.cfg
        settings = VisionSettings.from_dir(model_dir)
        lim = derive_limits(limits or Limits(), settings, cfg.vision.patch_size, cfg.vision.spatial_merge_size)
        specs = family.export_spec(model, dtype, device)
        modules = {spec.name: spec.module for spec in specs}
        import onnx

        graphs = {}
        for spec in specs:
            with stages.stage(f"export {spec.name}.onnx"):
                size = sum(p.numel() * p.element_size() for p in spec.module.parameters())
                path = tmp / f"{spec.name}.onnx"
                export_graph(spec, path, opset,
                             external_data=size > EXTERNAL_DATA_BYTES or spec.name in EXTERNAL_DATA_GRAPHS)
                name_dynamic_dims(path, spec)
                name_graph_weights(path, spec.module)
                graphs[spec.name] = graph_io(onnx.load(str(path), load_external_data=False))
        if quant.enabled:
            with stages.stage(f"quantize trunk.onnx ({quant.scheme} {quant.method}, block {quant.block_size})"):
                quant_summary = quantize_trunk(tmp / "trunk.onnx", modules["trunk"], quant,
                                               external_data="trunk" in EXTERNAL_DATA_GRAPHS)
                graphs["trunk"] = graph_io(onnx.load(str(tmp / "trunk.onnx"), load_external_data=False))
                ran = executed_ops(tmp / "trunk.onnx", model.trunk.num_layers, cfg.text, precision)
                quant_summary["onnxruntime_ran"] = {op: ran.get(op, 0) for op in ("MatMulNBits", "DequantizeLinear",
                                                                                   "MatMul")}
        for spec in specs:  # after quantization: which initializer holds each weight of equal value to another's
            record_weight_aliases(tmp / f"{spec.name}.onnx", spec.module)
        with stages.stage("write head.safetensors and tokenizer files"):
            from safetensors.torch import save_file
            head_tensors = quantize_head(model.head, quant) if quant.enabled else model.head.weights()
            save_file({k: v.contiguous().cpu() for k, v in head_tensors.items()}, str(tmp / "head.safetensors"))
            (tmp / "head.safetensors").chmod(0o644)  # readable like the rest of the export (a service account)
            src = Path(model_dir).expanduser()
            for name in CARRIED_FILES:
                if (src / name).is_file():  # content only (no links, no metadata); a link out of the folder refused
                    shutil.copyfile(confined(src, name), tmp / name)
                    (tmp / name).chmod(0o644)
        with stages.stage("TensorRT compatibility check"):
            compat = {s.name: [str(f) for f in check_graph(tmp / f"{s.name}.onnx")] for s in specs}
            bad = {g: f for g, f in compat.items() if f}
            if not quant.tensorrt:  # known and chosen: the trunk is ONNX Runtime's MatMulNBits
                bad.pop("trunk", None)
                if not quiet:
                    print(f"note: --quantize {quant.scheme} writes the trunk as MatMulNBits, for ONNX Runtime only "
                          "(TensorRT cannot build it)", file=sys.stderr)
            if bad:
                msg = "; ".join(f"{g}: {', '.join(f[:5])}" for g, f in bad.items())
                if tensorrt:
                    raise ExportError(f"the graphs use what TensorRT cannot parse: {msg}")
                print(f"warning: TensorRT would reject these graphs: {msg}", file=sys.stderr)
        report = {"status": "not run", "reason": "--no-validate", "rows": []}
        qerror = None
        if quant.enabled and validate:
            with stages.stage("quantization error on calibration prompts (sample videos)"):
                qerror = measure_quantization_error(model, model_dir, tmp, precision, quant)
                if not quiet:
                    print(calibration_table(qerror), file=sys.stderr)
        if quant.enabled and validate:  # parity: PyTorch on the very same weights, the graph at float accuracy
            load_trunk_weights(modules["trunk"], trunk_weights(tmp / "trunk.onnx"))
        if validate:
            with stages.stage("validate ONNX Runtime against PyTorch"):
                from export.validate import validate_export
                names = {s.name: s.input_names for s in specs}
                report = validate_export(model, tmp, precision, names["trunk"], names["vision"])
                if qerror is not None:
                    report["quantization_error"] = qerror
                if not quiet and report.get("table"):
                    print(report["table"], file=sys.stderr)
                elif not quiet:
                    print(f"validation {report['status']}: {report.get('reason', '')}", file=sys.stderr)
        manifest = {
            "model_type": cfg.model_type, "config": cfg.to_dict(), "precision": precision,
            "limits": asdict(lim), "graphs": graphs, "validation": report,
            "tensorrt_compat": {"source": "export/tensorrt_onnx_ops.json", "findings": compat},
            "quantization": {**quant.describe(), **({"trunk": quant_summary} if quant.enabled else {})},
            "tools": tool_versions(),
            "source_model": str(Path(model_dir).expanduser().resolve()), "opset": opset,
        }
        del model, specs, modules
        gc.collect()  # free the PyTorch weights before TensorRT builds (Jetson shares CPU/GPU memory)
        if tensorrt:
            with stages.stage("build TensorRT engines"):
                manifest["tensorrt"] = build_all(tmp, cfg, lim, precision)
        with stages.stage("hash files, write manifest.json"):
            write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def measure_quantization_error(model, model_dir, root: Path, precision: str, quant: Quantization) -> dict:
    """The quantized model as the runtime runs it (trunk graph, quantized head) against the unquantized one."""
    from export.calibration import calibration_prompts, quantization_error
    from export.sessions import ort_session
    from models.registry import family

    load_head = family(model.cfg.model_type).load_head
    head = load_head(model.cfg, root / "head.safetensors", precision, "cpu", quant.describe())
    return quantization_error(model, head, ort_session(root / "trunk.onnx"), calibration_prompts(model_dir, model.cfg))


def trt_profiles(cfg, lim: Limits) -> dict:
    from export.tensorrt_build import Profile, trunk_profiles, vision_profiles
    from models.registry import family

    t, v = cfg.text, cfg.vision
    shapes = getattr(family(cfg.model_type), "trt_vision_shapes", None)  # a vision graph of another contract
    vision = [Profile("vision", shapes(cfg, lim.max_vision_patches, lim.max_frame_patches))] if shapes else \
        vision_profiles(v.patch_dim, v.spatial_merge_size, lim.max_vision_patches, lim.max_frame_patches)
    return {
        "trunk": trunk_profiles(t.hidden_size, t.num_key_value_heads, t.head_dim, t.num_hidden_layers - 1,
                                lim.max_prompt, lim.max_context, getattr(t, "deepstack_layers", 0), lim.max_batch),
        "vision": vision,
    }


def build_all(root: Path, cfg, lim: Limits, precision: str) -> dict:
    from export.tensorrt_build import build_engine, import_tensorrt

    trt = import_tensorrt()
    built = {"version": trt.__version__, "engines": {}}
    for graph, profiles in trt_profiles(cfg, lim).items():
        build_engine(root / f"{graph}.onnx", root / f"{graph}.plan", profiles, root / "timing.cache")
        built["engines"][graph] = {"file": f"{graph}.plan", "profiles": [p.name for p in profiles]}
    return built


__all__ = ["Limits", "export_model", "UserError"]
