"""Static check that an ONNX graph is one TensorRT's ONNX parser accepts; needs no TensorRT.

The supported-operator table is data (``tensorrt_onnx_ops.json``, source named inside). Checked per node:
the operator is in the table, the opset is within what TensorRT 10.3 parses, the node's data input has a
type the operator supports, no tensor anywhere has a type TensorRT lacks (double, uint16/32/64, string,
complex), and no data-dependent control flow (If, Loop, Scan, NonZero, ...) is present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_TABLE = Path(__file__).with_name("tensorrt_onnx_ops.json")
# ONNX element type name -> the name the TensorRT support matrix uses
_TYPE_NAMES = {"FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
               "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4"}


@dataclass
class Finding:
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.problem}"


def load_table() -> dict:
    return json.loads(_TABLE.read_text())


def check_graph(path: str | Path) -> list[Finding]:
    """Every reason TensorRT's parser would reject the graph; empty when it is compatible."""
    import onnx

    table = load_table()
    model = onnx.load(str(path), load_external_data=False)
    findings: list[Finding] = []
    blocked = table["blocked_quantization"]
    uses_blocked = any(n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
                       for n in model.graph.node)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and uses_blocked and imp.version <= blocked["opset"]:
            continue  # opset 21 for blocked weight quantization only (see the table's note)
        if imp.domain in ("", "ai.onnx") and imp.version > table["max_opset"]:
            findings.append(Finding("<model>", "opset", f"opset {imp.version} > {table['max_opset']} "
                                    f"(TensorRT {table['tensorrt_min_version']} parses up to {table['max_opset']})"))
    types = _tensor_types(model)
    ok_types = set(table["tensor_types"])
    for name, t in types.items():
        if t not in ok_types:
            findings.append(Finding(name, "tensor", f"type {t} is not a TensorRT type"))
    for i, node in enumerate(model.graph.node):
        label = node.name or f"node_{i}"
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(label, node.op_type, f"custom domain {node.domain!r} needs a plugin"))
            continue
        if node.op_type in table["data_dependent_control_flow"]:
            findings.append(Finding(label, node.op_type, "data-dependent control flow"))
            continue
        supported = table["operators"].get(node.op_type)
        if supported is None:
            findings.append(Finding(label, node.op_type, "operator not supported by TensorRT's ONNX parser"))
            continue
        if node.op_type == "DequantizeLinear":
            findings += _dequantize_findings(label, node, types, model, blocked)
        data_in = next((x for x in node.input if x), None)
        t = types.get(data_in) if data_in else None
        if t is not None and t in _TYPE_NAMES and _TYPE_NAMES[t] not in supported:
            findings.append(Finding(label, node.op_type, f"input {data_in!r} has type {t}; "
                                    f"TensorRT supports {', '.join(supported)} here"))
    return findings


def _dequantize_findings(label: str, node, types: dict[str, str], model, blocked: dict) -> list[Finding]:
    """Weight-only dequantization as TensorRT builds it: INT8/INT4 weights, symmetric (zero point absent or 0)."""
    from onnx import numpy_helper

    out = []
    t = types.get(node.input[0])
    if t is not None and t not in blocked["types"]:
        out.append(Finding(label, node.op_type,
                           f"quantized type {t}; TensorRT dequantizes {', '.join(blocked['types'])}"))
    if len(node.input) > 2 and node.input[2]:
        zp = next((i for i in model.graph.initializer if i.name == node.input[2]), None)
        if zp is None or numpy_helper.to_array(zp).astype("float32").any():
            out.append(Finding(label, node.op_type, "non-zero zero point: TensorRT's dequantize layer takes symmetric "
                                                    "weights only"))
    return out


def _tensor_types(model) -> dict[str, str]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort: graph inputs and initializers still get checked
        inferred = model
    g = inferred.graph
    out: dict[str, str] = {}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
    for init in g.initializer:
        out[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = onnx.TensorProto.DataType.Name(a.t.data_type)
    return out
