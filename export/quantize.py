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

import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import UserError
from models.qwen2_5_vl.model import HEAD_LINEARS

SCHEMES = ("none", "int8", "int4")
METHODS = ("rtn",)
DEFAULT_BLOCK = 128  # what ONNX Runtime's quantizer, onnxruntime-genai's builder and ModelOpt's INT4 AWQ default to
# MatMulNBits: activations rounded to int8 per block inside the kernel (measured, one 4096 x 3584 matmul on
# 2 cores: int4 0.66 -> 0.27 ms, int8 61 -> 0.55 ms)
ACCURACY_LEVEL = 4


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

def _fingerprint(a: np.ndarray) -> tuple:
    flat = a.reshape(-1)
    return (a.shape, flat[: 64].tobytes(), flat[-64:].tobytes())


def trunk_linears(trunk) -> dict[str, torch.nn.Linear]:
    """Every linear of the trunk's layers by module path (``layers.<i>.self_attn.qkv_proj`` when fused)."""
    return {f"layers.{i}.{name}": mod for i, layer in enumerate(trunk.layers)
            for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}


def name_trunk_weights(model_proto, trunk) -> dict[str, str]:
    """Rename the MatMul weight initializers of the exported trunk after the PyTorch linears they hold
    (``layers.<i>.<linear>``; the exporter's names are arbitrary), matched by value. Returns the node names
    of those MatMuls, keyed by the new weight name."""
    from onnx import numpy_helper

    linears = trunk_linears(trunk)
    want: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for name, lin in linears.items():
        w = lin.weight.detach().float().cpu().t().contiguous().numpy()
        want.setdefault(_fingerprint(w), []).append((name, w))
    inits = {i.name: i for i in model_proto.graph.initializer}
    renamed: dict[str, str] = {}
    nodes: dict[str, str] = {}
    for node in model_proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        for name, w in want.get(_fingerprint(arr), []):
            if name not in nodes and np.array_equal(arr, w):
                if init.name not in renamed:
                    renamed[init.name] = name
                    init.name = name
                node.input[1] = renamed.get(node.input[1], node.input[1])
                nodes[name] = node.name
                break
    missing = sorted(set(linears) - set(nodes))
    if missing:
        raise QuantizationError(f"the exported trunk graph has no MatMul holding {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}; cannot quantize it")
    return nodes


def quantize_trunk(path: Path, trunk, q: Quantization, external_data: bool) -> dict:
    """Quantize every decoder linear of trunk.onnx in place; returns a summary for the manifest."""
    import onnx

    model = onnx.load(str(path))
    nodes = name_trunk_weights(model, trunk)
    out = _run_quantizer(model, q, q.block_size, q.trunk_form, nodes=list(nodes.values()))
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save(out, str(path), save_as_external_data=external_data, location=data.name if external_data else None)
    ops = {n.op_type for n in out.graph.node}
    return {"quantized_linears": len(nodes), "ops": sorted(ops & {"MatMulNBits", "DequantizeLinear"})}


_SUFFIX = re.compile(r"(_DQ)?_Q[48]$")


def trunk_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights [out, in] the quantized trunk graph stands for, keyed ``layers.<i>.<linear>``:
    what PyTorch must run to compute exactly what the graph computes (the torch backend and the parity check)."""
    import onnx
    from onnx import numpy_helper

    from models.quantized import dequantize

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name and name in inits else None

    out: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            codes, scales, zp = (arr(node.input[i]) if len(node.input) > i else None for i in (1, 2, 3))
            w = dequantize(torch.from_numpy(codes.copy()), torch.from_numpy(scales.copy()),
                           None if zp is None else torch.from_numpy(zp.copy()), attrs["bits"], attrs["block_size"],
                           attrs["K"])
            out[_SUFFIX.sub("", node.input[1])] = w
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = arr(node.input[0]).astype(np.float32)  # [K, N]
            s = arr(node.input[1]).astype(np.float32)  # [K / block, N]
            z = arr(node.input[2]).astype(np.float32) if len(node.input) > 2 and node.input[2] else 0.0
            block = attrs.get("block_size", q.shape[0])
            w = (q - np.repeat(z, block, axis=0)[: q.shape[0]] if np.ndim(z) else q) * np.repeat(s, block, axis=0)
            out[_SUFFIX.sub("", node.input[0])] = torch.from_numpy(np.ascontiguousarray(w.T))
    return out


def load_trunk_weights(trunk, weights: dict[str, torch.Tensor], block_size: int,
                       int8_activations: bool = True) -> None:
    """Put dequantized weights into the PyTorch trunk's linears (in place, keeping dtype and device). With
    ``int8_activations`` their inputs are also rounded to int8 per block as ONNX Runtime's kernel rounds them at
    the runtime's accuracy level (``fake_quantize_activations``): the torch backend then computes each matmul as
    the ort backend does; without, the trunk computes what the graph computes at accuracy level 0 (the export's
    parity check)."""
    from models.quantized import fake_quantize_activations

    if any(name.endswith(("qkv_proj", "gate_up_proj")) for name in weights):
        for layer in trunk.layers:  # the graph's layout: q/k/v and gate/up fused (see the spec)
            layer.fuse_projections()
    for name, w in weights.items():
        lin = trunk.get_submodule(name.removesuffix(".weight"))
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(w.to(lin.weight.device, lin.weight.dtype), requires_grad=False)
        if int8_activations:
            lin.register_forward_pre_hook(lambda _m, args: (fake_quantize_activations(args[0], block_size),))


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

    from export.validate import ort_session, with_zero_inputs

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
