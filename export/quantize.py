"""Weight-only quantization of an export: the trunk graph's linears (ONNX Runtime's quantizer), the head's
linears (the same quantizer, one weight at a time, kept in MatMulNBits layout for ``models.quantized``), the
embedding table (int8 per row). The vision encoder stays in the export precision.

Forms of the trunk graph, chosen per scheme and recorded in the manifest:
- int4: standard QDQ, DequantizeLinear(int4, symmetric, blocked along K, opset 21) + MatMul. ONNX Runtime
  fuses the pair into its MatMulNBits kernel at load (its profiler, run at export, records which kernels
  ran: the manifest's ``quantization.trunk.onnxruntime_ran``); TensorRT 10 builds blocked INT4
  DequantizeLinear as weight-only INT4 (symmetric only: its dequantize layer rejects zero points), which is
  why int4 is symmetric. Not verified against TensorRT here (no TensorRT on these machines).
- int8: MatMulNBits (ONNX Runtime contrib op; the quantizer has no QDQ form for 8 bits): ONNX Runtime only;
  TensorRT cannot parse it.

Method: round to nearest (symmetric, one scale per block). The quantizer's other methods were measured and
left out: HQQ writes float zero points, which ONNX Runtime 1.32's MatMulNBits CPU kernel runs about 100x
slower and in float (27 ms against 0.27 ms for one 4096 x 3584 int4 matmul, 2 cores); its GPTQ (vendored
from neural-compressor) fails to pack zero points for layers with an odd number of blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.sessions import ACCURACY_LEVEL, ort_session, with_zero_inputs
from models.errors import UserError
from models.qwen2_5_vl.model import HEAD_LINEARS

SCHEMES = ("none", "int8", "int4")
METHODS = ("rtn",)
DEFAULT_BLOCK = 128  # what ONNX Runtime's quantizer, onnxruntime-genai's builder and ModelOpt's INT4 AWQ default to


class QuantizationError(UserError):
    """A quantization setting that cannot be exported or run."""


@dataclass
class Quantization:
    scheme: str = "none"  # none, int8, int4
    block_size: int = 0  # 0: DEFAULT_BLOCK, or the largest valid size when that does not divide every layer
    method: str = "rtn"

    @property
    def bits(self) -> int:
        return {"none": 0, "int8": 8, "int4": 4}[self.scheme]

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    @property
    def trunk_form(self) -> str:
        return "qdq" if self.scheme == "int4" else "matmulnbits"

    @property
    def tensorrt(self) -> bool:
        """Whether TensorRT can build the trunk graph of this scheme."""
        return not self.enabled or self.trunk_form == "qdq"

    def resolve(self, text_cfg, precision: str, tensorrt: bool = False) -> Quantization:
        """Check the setting against the model and the export options; fills in the block size."""
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"--quantize {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise QuantizationError(f"--quant-method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.enabled:
            return self
        if precision == "bf16":
            raise QuantizationError(f"--quantize {self.scheme} needs --precision fp32 or fp16: ONNX Runtime has no "
                                    "bf16 kernels to run or validate a quantized graph")
        if tensorrt and not self.tensorrt:
            raise QuantizationError(f"--quantize {self.scheme} writes the trunk as MatMulNBits, which TensorRT cannot "
                                    "build; for --tensorrt use --quantize int4")
        dims = layer_inputs(text_cfg)
        valid = valid_block_sizes(dims)
        if not self.block_size:
            if not valid:
                raise QuantizationError(f"no block size in 16, 32, ... divides every layer's input size "
                                        f"({', '.join(f'{k} {v}' for k, v in dims.items())})")
            size = DEFAULT_BLOCK if DEFAULT_BLOCK in valid else max(valid)
            return Quantization(self.scheme, size, self.method)
        b = self.block_size
        if b < 16 or b & (b - 1):
            raise QuantizationError(f"--block-size {b}: must be a power of two, at least 16 (valid for this model: "
                                    f"{', '.join(map(str, valid)) or 'none'})")
        bad = next((name for name, k in dims.items() if k % b), None)
        if bad is not None:
            raise QuantizationError(f"--block-size {b} does not divide {bad}'s input size {dims[bad]}; valid sizes "
                                    f"for this model: {', '.join(map(str, valid)) or 'none'}")
        return self

    def describe(self) -> dict:
        """The manifest's ``quantization`` entry."""
        d = asdict(self)
        if self.enabled:
            d.update(bits=self.bits, symmetric=True, accuracy_level=ACCURACY_LEVEL,
                     trunk_form=self.trunk_form, tensorrt=self.tensorrt, head="matmulnbits",
                     embedding="int8 per row", vision="export precision")
        return d


def layer_inputs(text_cfg) -> dict[str, int]:
    """Input size of every quantized linear (the dimension blocks are cut along)."""
    h = text_cfg.hidden_size
    return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": text_cfg.num_attention_heads * text_cfg.head_dim,
            "gate_proj": h, "up_proj": h, "down_proj": text_cfg.intermediate_size, "lm_head": h}


def valid_block_sizes(dims: dict[str, int]) -> list[int]:
    return [b for b in (16, 32, 64, 128, 256) if all(k % b == 0 for k in dims.values())]


# -- the quantizer --------------------------------------------------------------------------------------------

def _algo(q: Quantization, block_size: int, form: str):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    fmt = QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator
    return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                        quant_format=fmt, bits=q.bits)


def _run_quantizer(model, q: Quantization, block_size: int, form: str, nodes: list[str] | None = None):
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    if form == "qdq":
        for imp in model.opset_import:  # blocked DequantizeLinear and the int4 type are opset 21 (see module doc)
            if imp.domain in ("", "ai.onnx"):
                imp.version = max(imp.version, 21)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_include=nodes, algo_config=_algo(q, block_size, form))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer.process()
    return quantizer.model.model


def quantize_matrix(weight: torch.Tensor, q: Quantization, block_size: int) -> dict[str, torch.Tensor]:
    """One weight W [N, K] in MatMulNBits layout (codes, scales, zero_points), by the same quantizer and
    method as the trunk (a one-node graph x @ W^T)."""
    from onnx import TensorProto, helper, numpy_helper

    from models.quantized import IR_VERSION

    w = weight.detach().float().cpu()
    n, k = w.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="m")
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.t().numpy()), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)
    out = _run_quantizer(model, q, block_size, "matmulnbits")
    node = next(x for x in out.graph.node if x.op_type == "MatMulNBits")
    inits = {i.name: i for i in out.graph.initializer}
    names = ("codes", "scales", "zero_points")
    return {key: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
            for key, name in zip(names, node.input[1:4]) if name}


# -- the trunk graph ------------------------------------------------------------------------------------------

def quantize_trunk(path: Path, module, q: Quantization, external_data: bool) -> dict:
    """Quantize every decoder linear of trunk.onnx (exported from ``module``, the trunk graph's module) in
    place; returns a summary for the manifest."""
    import onnx

    from export.graph_weights import name_matmul_weights

    model = onnx.load(str(path))
    nodes = name_matmul_weights(model, module)
    out = _run_quantizer(model, q, q.block_size, q.trunk_form, nodes=list(nodes.values()))
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save(out, str(path), save_as_external_data=external_data, location=data.name if external_data else None)
    if data.exists():
        data.chmod(0o644)  # onnx writes it owner-only; readable like the rest of the export (a service account)
    ops = {n.op_type for n in out.graph.node}
    return {"quantized_linears": len(nodes), "ops": sorted(ops & {"MatMulNBits", "DequantizeLinear"})}


def trunk_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights [out, in] the quantized trunk graph stands for, keyed by linear path
    (``trunk.layers.<i>.<linear>``): what PyTorch runs to compute what the graph computes (the parity check)."""
    import onnx

    from export.graph_weights import iter_initializers, matmulnbits_tensors, quantized_linears
    from models.quantized import dequantize

    proto = onnx.load(str(path), load_external_data=False)
    quant = quantized_linears(proto)
    wanted = {e[k] for e in quant.values() for k in ("codes", "scales", "zero_points") if e[k]}
    parts = {name: t for name, t in iter_initializers(path, proto) if name in wanted}
    out = {}
    for name, e in quant.items():
        t = matmulnbits_tensors(e, parts)
        out[name] = dequantize(t["codes"], t["scales"], t.get("zero_points"), e["bits"], e["block_size"], e["k"])
    return out


def load_trunk_weights(module, weights: dict[str, torch.Tensor]) -> None:
    """Put dequantized weights into ``module``'s linears (in place, keeping dtype and device): PyTorch then
    computes what the quantized graph computes at float accuracy (the export's parity check)."""
    for name, w in weights.items():
        lin = module.get_submodule(name)
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(w.to(lin.weight.device, lin.weight.dtype), requires_grad=False)


# -- the head -------------------------------------------------------------------------------------------------

def head_linears(head) -> dict[str, torch.nn.Linear]:
    return {name: head.get_submodule(name) for name in HEAD_LINEARS}


def quantize_head(head, q: Quantization, progress=None) -> dict[str, torch.Tensor]:
    """head.safetensors tensors of a quantized export: every head linear as ``<name>.codes/.scales
    [/.zero_points]`` (x @ W^T) and ``<name>.bwd_*`` (W^T quantized along N, for V-Reason's backward),
    biases as they are, the embedding table int8 per row, norms as they are."""
    from models.quantized import QuantEmbedding, backward_block

    out: dict[str, torch.Tensor] = {}
    linears = head_linears(head)
    for name, lin in linears.items():
        w = lin.weight.detach()
        for key, t in quantize_matrix(w, q, q.block_size).items():
            out[f"{name}.{key}"] = t
        for key, t in quantize_matrix(w.t(), q, backward_block(w.shape[0], q.block_size)).items():
            out[f"{name}.bwd_{key}"] = t
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.detach().cpu()
        if progress:
            progress(name)
    for key, t in QuantEmbedding.quantize(head.embed_tokens.weight).items():
        out[f"embed_tokens.{key}"] = t
    skip = {f"{name}.{p}" for name in linears for p in ("weight", "bias")} | {"embed_tokens.weight"}
    for key, t in head.state_dict().items():
        if key not in skip:
            out[key] = t.detach().cpu()
    return out


def executed_ops(path: Path, num_layers: int, text_cfg, precision: str = "fp32") -> dict[str, int]:
    """Operator types ONNX Runtime's profiler records running for one decode step of the trunk graph with the
    runtime's settings: shows whether blocked DequantizeLinear + MatMul were fused into MatMulNBits (packed
    weights read directly) or run as written (weights dequantized every step)."""
    import json
    import tempfile


    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, profile_prefix=str(Path(tmp) / "trunk"))
        dt = np.float16 if precision == "fp16" else np.float32
        past = np.zeros((1, 3, text_cfg.num_key_value_heads, text_cfg.head_dim), dt)
        feed = {"inputs_embeds": np.zeros((1, 1, text_cfg.hidden_size), dt),
                "position_ids": np.full((3, 1, 1), 3, np.int64), "cache_length": np.array([3], np.int64)}
        for i in range(num_layers):
            feed[f"past_key.{i}"] = feed[f"past_value.{i}"] = past
        sess.run(None, with_zero_inputs(sess, feed, seq=1, dtype=dt))
        events = json.loads(Path(sess.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for e in events:
        op = e.get("args", {}).get("op_name")
        if e.get("cat") == "Node" and op and e.get("name", "").endswith("_kernel_time"):
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))
