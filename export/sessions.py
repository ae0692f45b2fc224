"""ONNX Runtime sessions over exported graphs with the runtime's settings, shared by the export's validation and
its quantization measurements."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# MatMulNBits: activations rounded to int8 per block inside the kernel (measured, one 4096 x 3584 matmul on
# 2 cores: int4 0.66 -> 0.27 ms, int8 61 -> 0.55 ms)
ACCURACY_LEVEL = 4


def with_zero_inputs(session, feed: dict, seq: int, dtype) -> dict:
    """``feed`` plus zeros for every graph input it lacks (a trunk's DeepStack features on a call without
    visual tokens); dynamic dims: batch 1, seq ``seq``."""
    out = dict(feed)
    for i in session.get_inputs():
        if i.name not in out:
            shape = [d if isinstance(d, int) else (seq if d == "seq" else 1) for d in i.shape]
            out[i.name] = np.zeros(shape, dtype)
    return out


def ort_session(path: Path, device: str = "cpu", exact: bool = False, profile_prefix: str | None = None):
    """A session over an exported graph with the runtime's settings (quantized matmuls at its accuracy level,
    int8 activations), or ``exact``: quantized matmuls in float (accuracy level 0), so that a quantized graph
    can be compared with PyTorch running the same dequantized weights within float tolerance. (Against the
    runtime's int8 activations no such bound holds through a deep trunk: an activation on a rounding boundary
    lands on the neighbouring step under a 1e-7 difference, and the flips cascade through the layers.)"""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0" if exact else str(ACCURACY_LEVEL))
    if profile_prefix:  # ONNX Runtime's profiler: which kernels ran (see ``export.quantize.executed_ops``)
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    if not exact:
        return ort.InferenceSession(str(path), opts, providers=providers)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = [a for n in model.graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "accuracy_level"]
    if not nodes:
        return ort.InferenceSession(str(path), opts, providers=providers)
    for a in nodes:
        a.i = 0
    copy = path.with_name(f".{path.stem}.exact.onnx")  # beside the original, so that its external data resolves
    try:
        onnx.save(model, str(copy))
        return ort.InferenceSession(str(copy), opts, providers=providers)
    finally:
        copy.unlink(missing_ok=True)
