"""TensorRT engines from the exported graphs (TensorRT 10 Python API), and the equivalent trtexec commands.

tensorrt is imported lazily: nothing here is needed to export ONNX or to run on ONNX Runtime.
Every TensorRT call that reports failure through a return value is checked, and the message names the
graph, the tensor and the value. This path cannot run on the CI machines (no GPU, no TensorRT there);
its GPU test skips without them, and the profile shapes below are unit-tested without TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.manifest import ExportError

Shape = tuple[int, ...]


@dataclass
class Profile:
    """One optimization profile: input name -> (min, opt, max) shape."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]


def trunk_profiles(hidden: int, kv_heads: int, head_dim: int, layers: int, max_prompt: int,
                   max_context: int, deepstack_layers: int = 0, max_batch: int = 1) -> list[Profile]:
    """prefill: S in [1, max_prompt], P = 0; decode: S = 1, P in [1, max_context], B in [1, max_batch] rows
    (dynamic decode passes the filled cache; static decode the whole fixed-capacity cache, one shape for a whole
    answer, so TensorRT plans once and the step can be captured in a CUDA graph; a batch of requests passes their
    pool's buffers whole, ``cache_length`` [B] each row's length); suffix: S in [2, max_prompt - 1], P in
    [1, max_prompt - 1] (a prompt's suffix on a reused prefix, a later prefill chunk). Prefill and suffix take one
    row (a request is prefilled alone). ``deepstack_layers`` K > 0: the trunk also takes deepstack_embeds
    [K, B, S, hidden]."""
    def make(name, s, p, b=(1, 1, 1)):
        shapes = {"inputs_embeds": tuple((n, x, hidden) for n, x in zip(b, s)),
                  "position_ids": tuple((3, n, x) for n, x in zip(b, s)),
                  "cache_length": tuple((n,) for n in b)}
        if deepstack_layers:
            shapes["deepstack_embeds"] = tuple((deepstack_layers, n, x, hidden) for n, x in zip(b, s))
        for i in range(layers):
            for kind in ("past_key", "past_value"):
                shapes[f"{kind}.{i}"] = tuple((n, x, kv_heads, head_dim) for n, x in zip(b, p))
        return Profile(name, shapes)

    opt_prompt = min(max_prompt, 1024)
    profiles = [make("prefill", (1, opt_prompt, max_prompt), (0, 0, 0)),
                make("decode", (1, 1, 1), (1, min(max_context, 2048), max_context),
                     (1, min(max_batch, 4), max_batch))]
    if max_prompt >= 3:
        top = max_prompt - 1
        profiles.append(make("suffix", (2, min(64, top), top), (1, min(opt_prompt, top), top)))
    return profiles


def vision_profiles(patch_dim: int, merge: int, max_patches: int, max_frame_patches: int) -> list[Profile]:
    unit = merge * merge
    lo, opt = unit, min(max_patches, 4096)
    fopt = min(max_frame_patches, 1024)
    return [Profile("vision", {
        "pixel_values": ((lo, patch_dim), (opt, patch_dim), (max_patches, patch_dim)),
        "rotary_pos": ((lo, 2), (opt, 2), (max_patches, 2)),
        "window_index": ((1,), (opt // unit,), (max_patches // unit,)),
        "reverse_index": ((1,), (opt // unit,), (max_patches // unit,)),
        "window_segments": ((unit,), (fopt,), (max_frame_patches,)),
    })]


def trtexec_command(onnx: str, plan: str, profiles: list[Profile], precision: str, cache: str) -> str:
    """The trtexec line building the same engine; one --minShapes/--optShapes/--maxShapes group per profile
    (trtexec of TensorRT >= 8.6 makes one optimization profile per repeated group)."""
    def fmt(shapes, k):
        return ",".join(f"{n}:{'x'.join(str(d) for d in s[k])}" for n, s in shapes.items())

    parts = [f"trtexec --onnx={onnx} --saveEngine={plan} --stronglyTyped --timingCacheFile={cache}"]
    for p in profiles:
        parts.append(f"--minShapes={fmt(p.shapes, 0)} --optShapes={fmt(p.shapes, 1)} --maxShapes={fmt(p.shapes, 2)}")
    del precision  # the graph's own types decide precision in a strongly typed network
    return " \\\n    ".join(parts)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(
            "--tensorrt needs the tensorrt Python package (TensorRT >= 10.3) and an NVIDIA GPU: "
            "pip install 'tensorrt>=10.3' (x86_64), or use the TensorRT that JetPack ships on Jetson; "
            "or build on the device with the commands from --print-trtexec") from None
    return trt


def build_engine(onnx_path: Path, plan_path: Path, profiles: list[Profile], cache_path: Path,
                 workspace_bytes: int = 4 << 30) -> None:
    """Parse ``onnx_path`` into a strongly typed network and serialize an engine with ``profiles``."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise ExportError("TensorRT could not create a builder (no usable GPU or driver?)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if network is None:
        raise ExportError("TensorRT could not create a network definition")
    parser = trt.OnnxParser(network, logger)
    if parser is None:
        raise ExportError("TensorRT could not create an ONNX parser")
    # parse_from_file resolves external data (.onnx.data) next to the graph
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if config is None:
        raise ExportError("TensorRT could not create a builder config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ExportError(f"TensorRT could not use the timing cache {cache_path}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in profiles:
        p = builder.create_optimization_profile()
        if p is None:
            raise ExportError("TensorRT could not create an optimization profile")
        missing = inputs - set(prof.shapes)
        if missing:
            raise ExportError(f"profile {prof.name!r} gives no shape for input(s) {', '.join(sorted(missing))}")
        for name, (lo, opt, hi) in prof.shapes.items():
            try:
                p.set_shape(name, lo, opt, hi)
            except (RuntimeError, TypeError, ValueError) as e:
                raise ExportError(f"profile {prof.name!r}: TensorRT refused shapes min={lo} opt={opt} max={hi} "
                                  f"for input {name!r} ({e})") from None
        if not bool(p):  # the Python binding's truth value is IOptimizationProfile::isValid()
            raise ExportError(f"profile {prof.name!r} of {onnx_path.name} is inconsistent: {prof.shapes}")
        if config.add_optimization_profile(p) < 0:
            raise ExportError(f"TensorRT refused profile {prof.name!r} of {onnx_path.name}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    updated = config.get_timing_cache()
    if updated is not None:
        cache_path.write_bytes(bytes(updated.serialize()))
