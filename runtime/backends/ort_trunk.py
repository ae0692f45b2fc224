"""An ONNX Runtime-only form of an export's trunk graph, derived at load: the same weights and math in ONNX
Runtime's fused CPU operators, over a head-major KV cache, for the ort backend on CPU.

The exported ``trunk.onnx`` stays standard ONNX (what TensorRT builds): a Qwen decoder layer traces into about
60 small operators (RMSNorm alone is seven, rotary a Slice/Neg/Concat chain per tensor, the causal mask rebuilt
per layer, every layer's past concatenated with the new entries and transposed at every step), and on a
2-core CPU their dispatch and copies cost as much as the int4 weights' reads. Here each layer is about a
dozen nodes: SkipSimplifiedLayerNormalization (the residual add and RMSNorm in one), the trunk's own fused q/k/v and
gate/up matmuls as exported (MatMul, the int4 QDQ pair ONNX Runtime fuses into MatMulNBits, or MatMulNBits),
and GroupQueryAttention with the rotary embedding inside it: q/k/v packed as the fused matmul produces them
(Qwen3-VL: split for its q/k norms), rotated with cos/sin tables computed once per call from the M-RoPE
positions of the call's tokens and read through the kernel's ``position_ids`` (``ort_graph.gqa_inputs``; the
M-RoPE position of a visual or later token is not its cache position).

The cache contract is the head-major one of ``bindings`` with a batch axis: inputs ``inputs_embeds`` [B,S,H],
``position_ids`` [3,B,S], ``cache_length`` [B] (each row's entries before its new ones), [``deepstack_embeds``
[K,B,S,H]], ``cache_key.i``/``cache_value.i`` [B,kv,capacity,hd]; outputs ``hidden`` [B,S,H] and
``present_key.i``/``present_value.i``, bound to the same buffers as the inputs: GroupQueryAttention writes each
row's S new entries at its ``cache_length`` in place and attends causally over what precedes them in its row,
so nothing of the past is copied (entries at or after ``cache_length`` + S are never read: the static form's
unfilled end needs no mask). One row (B = 1) is a request's prefill chunk or step; B rows of one token each
are the running requests' decode steps together, one pass over the weights (``OrtBackend.trunk_rows``: the
rows of a ``runtime.pool.KVPool``).

Nothing is written: the graph is serialized in memory and its weight initializers are the export's own
TensorProtos, external data references included, which ONNX Runtime resolves in the export folder
(``session.model_external_initializers_file_folder_path``) and loads as it loads the standard graph's. Parity
with the standard graph is tested on both families, fp32 and quantized, prefill, decode and the fixed-capacity
(static) form (``tests/test_ort_trunk``).
"""

from __future__ import annotations

from pathlib import Path

from export.graph_weights import weight_aliases
from runtime.backends.ort_graph import GraphBuilder, gqa_inputs, grouped_query_attention, silu_gate


class Unsupported(Exception):
    """The trunk graph is not one this module can restate (the standard graph is used)."""


class _Builder(GraphBuilder):
    """The new graph, over the standard graph's initializers and weight consumers."""

    def __init__(self, proto) -> None:
        super().__init__()
        self.inits = {i.name: i for i in proto.graph.initializer}
        # a weight held under another's name (parameters of equal value share one initializer)
        self.aliases = {k: v for k, v in weight_aliases(proto).items() if k not in self.inits}
        self.consumers: dict[str, list] = {}
        for n in proto.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.used: dict[str, object] = {}  # the export's initializers the new graph takes over

    def has(self, name: str) -> bool:
        return name in self.inits or name in self.aliases

    def init(self, name: str) -> str:
        name = self.aliases.get(name, name)
        if name not in self.inits:
            raise Unsupported(f"the trunk graph has no initializer {name}")
        self.used[name] = self.inits[name]
        return name

    def linear(self, x: str, path: str) -> str:
        """x @ W for the linear at module ``path``, applied as the export applies it (the weight's consumer
        node, and its DequantizeLinear producer in the int4 QDQ form, copied with ``x`` as the activation)."""
        from onnx import helper

        for weight in (path, f"{path}_DQ_Q4", f"{path}_Q8", f"{path}_Q4"):
            if weight in self.inits:
                break
        else:
            raise Unsupported(f"no weight for {path}")
        users = self.consumers.get(weight, [])
        if len(users) != 1:
            raise Unsupported(f"{weight} has {len(users)} consumers")
        node = users[0]
        if node.op_type == "DequantizeLinear":
            for i in node.input:
                self.init(i)
            out = f"{path}.dequantized"
            self.nodes.append(helper.make_node("DequantizeLinear", list(node.input), [out], name=f"{path}.dq",
                                               domain=node.domain, **attrs(node)))
            matmuls = self.consumers.get(node.output[0], [])
            if len(matmuls) != 1 or matmuls[0].op_type != "MatMul":
                raise Unsupported(f"{weight} is not dequantized into one MatMul")
            y = self.op("MatMul", [x, out])
        elif node.op_type in ("MatMul", "MatMulNBits") and list(node.input).index(weight) == 1:
            for i in node.input[1:]:
                if i:
                    self.init(i)
            y = self.op(node.op_type, [x, *node.input[1:]], domain=node.domain, **attrs(node))
        else:
            raise Unsupported(f"{weight} feeds a {node.op_type}")
        if self.has(f"{path}.bias"):
            y = self.op("Add", [y, self.init(f"{path}.bias")])
        return y


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def build(trunk: Path, text) -> bytes:
    """The ORT-only trunk graph, serialized (weights by reference to the export's external data); ``text``:
    the family's text config. Raises ``Unsupported`` for a graph it cannot restate."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(trunk), load_external_data=False)
    ins = {i.name: i for i in proto.graph.input}
    if ins["inputs_embeds"].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise Unsupported("fp32 trunks only")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise Unsupported("the MLP activation is not silu")
    layers = sum(1 for n in ins if n.startswith("past_key."))
    heads, kv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    inter = text.intermediate_size
    qk_norm = bool(getattr(text, "qk_norm", False))
    b = _Builder(proto)

    cos, sin, rows, seqlens, total = gqa_inputs(b, "inputs_embeds", "position_ids", "cache_length",
                                                b.init("trunk.rotary.inv_freq"), hd // 2, list(text.mrope_section),
                                                bool(getattr(text, "mrope_interleaved", False)))
    deepstack = "deepstack_embeds" in ins
    levels = ins["deepstack_embeds"].type.tensor_type.shape.dim[0].dim_value if deepstack else 0

    def rms(x: str, weight: str, skip: str | None = None) -> tuple[str, str]:
        """(RMSNorm(x + skip), x + skip) in one node; without ``skip``, (RMSNorm(x), x)."""
        eps = float(text.rms_norm_eps)
        if skip is None:
            return b.op("SimplifiedLayerNormalization", [x, b.init(weight)], axis=-1, epsilon=eps), x
        normed, _, _, summed = b.op("SkipSimplifiedLayerNormalization", [x, skip, b.init(weight)], 4,
                                    domain="com.microsoft", epsilon=eps)
        return normed, summed

    residual, delta = "inputs_embeds", None
    for layer in range(layers):
        pre = f"trunk.layers.{layer}."
        a, residual = rms(delta or residual, pre + "input_layernorm.weight", residual if delta else None)
        qkv = [b.linear(a, pre + "self_attn.qkv_proj")]  # packed, as the attention takes it
        if qk_norm:
            q, k, v = b.op("Split", [qkv[0], b.const("qkv_sizes", [heads * hd, kv * hd, kv * hd])], 3, axis=-1)
            q = b.op("Reshape", [rms(b.op("Reshape", [q, b.const("shape_q", [0, -1, heads, hd])]),
                                     pre + "self_attn.q_norm.weight")[0], b.const("shape_q_flat", [0, -1, heads * hd])])
            k = b.op("Reshape", [rms(b.op("Reshape", [k, b.const("shape_k", [0, -1, kv, hd])]),
                                     pre + "self_attn.k_norm.weight")[0], b.const("shape_k_flat", [0, -1, kv * hd])])
            qkv = [q, k, v]
        out = grouped_query_attention(b, qkv, cos, sin, (f"cache_key.{layer}", f"cache_value.{layer}"),
                                      (f"present_key.{layer}", f"present_value.{layer}"), seqlens, total, heads, kv,
                                      rows)
        attn = b.linear(out, pre + "self_attn.o_proj")
        m, residual = rms(attn, pre + "post_attention_layernorm.weight", residual)
        gate, up = b.op("Split", [b.linear(m, pre + "mlp.gate_up_proj"), b.const("mlp_sizes", [inter, inter])], 2,
                        axis=-1)
        delta = b.linear(silu_gate(b, gate, up), pre + "mlp.down_proj")
        if layer < levels:  # DeepStack: row ``layer`` of the features joins this layer's output
            delta = b.op("Add", [delta, b.op("Gather", ["deepstack_embeds", b.const(f"level_{layer}", layer)])])
    b.op("Add", [residual, delta], ["hidden"])
    f = TensorProto.FLOAT
    cache = [helper.make_tensor_value_info(f"{kind}_{side}.{layer}", f, ["batch", kv, "capacity", hd])
             for layer in range(layers) for kind in ("cache", "present") for side in ("key", "value")]
    width = text.hidden_size  # the standard graph's inputs and output, with a batch axis (its are one row)
    batched = {"inputs_embeds": (f, ["batch", "S", width]), "position_ids": (TensorProto.INT64, [3, "batch", "S"]),
               "cache_length": (TensorProto.INT64, ["batch"]), "deepstack_embeds": (f, [levels, "batch", "S", width])}
    inputs = [helper.make_tensor_value_info(i.name, *batched[i.name]) for i in proto.graph.input
              if not i.name.startswith("past_")]
    inputs += [c for c in cache if c.name.startswith("cache_")]
    outputs = [helper.make_tensor_value_info("hidden", f, ["batch", "S", width])]
    outputs += [c for c in cache if c.name.startswith("present_")]
    graph = helper.make_graph(b.nodes, "trunk_ort", inputs, outputs,
                              [*b.used.values(), *b.consts.values()])
    opsets = {o.domain: o.version for o in proto.opset_import}
    opsets[""] = max(opsets.get("", 18), 18)
    opsets["com.microsoft"] = 1
    model = helper.make_model(graph, ir_version=proto.ir_version,
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    return model.SerializeToString()


def external_weights(trunk: Path) -> bool:
    """Whether the trunk's weights lie in ``trunk.onnx.data`` (large exports) rather than inside the graph file.
    Only then is the ORT-only form free in memory: built in memory, a graph with its weights inline costs more
    (measured on the bench export's int4 trunk: 688 MB resident after loading against 637 MB for the exported
    graph, and 1133 MB against 640 MB at the peak while loading)."""
    data = trunk.with_name(trunk.name + ".data")
    return data.is_file() and data.stat().st_size > 0


def session(trunk: Path, text, opts, providers):
    """An ONNX Runtime session over the ORT-only form of ``trunk`` (see ``build``); its external data is read
    from beside ``trunk`` as the standard graph's is (the same memory: measured on the bench export, fp32)."""
    import onnxruntime as ort

    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(trunk.parent))
    sess = ort.InferenceSession(build(trunk, text), opts, providers=providers)
    # onnxruntime's Python session keeps the serialized model to re-create itself on a provider fallback (CUDA
    # only); with weights inside the graph that is a second copy of them (measured on the bench export's int4
    # trunk: 854 -> 688 MB resident, against 637 MB for the exported graph). The CPU session never re-creates.
    if getattr(sess, "_model_bytes", None) is not None:
        sess._model_bytes = None
    return sess
