"""What the ort backend's derived graphs (``ort_trunk``, ``ort_head``) share: a node builder, the decoder layer's
attention in ONNX Runtime's operators, and running a session over bound torch tensors."""

from __future__ import annotations

import numpy as np
import torch

NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
            torch.bool: np.bool_}


class GraphBuilder:
    """Nodes and constants of a graph being built; node outputs are named by the builder."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.consts: dict[str, object] = {}
        self.n = 0

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        """One node; ``outputs``: their names, or how many to name. Returns the output name(s)."""
        if isinstance(outputs, int):
            outputs = [f"t{self.n}_{i}" for i in range(outputs)]
        self.n += 1
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs, name=f"n{self.n}_{op_type}", domain=domain,
                                                **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def name(self, kind: str) -> str:
        """A fresh tensor name."""
        self.n += 1
        return f"t{self.n}_{kind}"

    def const(self, name: str, values, dtype=np.int64) -> str:
        """A constant initializer (made once per name)."""
        from onnx import numpy_helper

        if name not in self.consts:
            self.consts[name] = numpy_helper.from_array(np.asarray(values, dtype=dtype), name)
        return name


def mrope_selection(half: int, section: list[int], interleaved: bool) -> np.ndarray:
    """[3, 1, 1, half] one-hot: which position axis (t, h, w) each rotary frequency follows (``MRoPE``)."""
    axis = np.zeros(half, dtype=np.int64)
    if interleaved:
        j = np.arange(half)
        axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    else:
        start = 0
        for i, n in enumerate(section):
            axis[start:start + n] = i % 3
            start += n
    return (axis[None, :] == np.arange(3)[:, None]).astype(np.float32).reshape(3, 1, 1, half)


def rotary_angles(g: GraphBuilder, positions: str, inv_freq: str, half: int, section: list[int],
                  interleaved: bool) -> str:
    """The rotary angles [S, half] of M-RoPE positions [3, 1, S] (int64): each frequency of ``inv_freq`` [half]
    times the position on the axis it follows (``MRoPE``: the one-hot pick and sum select it exactly)."""
    from onnx import TensorProto

    freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [positions], to=TensorProto.FLOAT),
                                            g.const("last_axis", [-1])]), inv_freq])  # [3, 1, S, half]
    pick = g.const("mrope_pick", mrope_selection(half, section, interleaved), np.float32)
    return g.op("Reshape", [g.op("ReduceSum", [g.op("Mul", [freqs, pick]), g.const("axis_0", [0])], keepdims=0),
                            g.const("shape_table", [-1, half])])


def gqa_inputs(g: GraphBuilder, x: str, positions: str, cache_length: str, inv_freq: str, half: int,
               section: list[int], interleaved: bool) -> tuple[str, str, str, str, str]:
    """What ``grouped_query_attention`` takes besides q/k/v and the cache, once per call of B rows of S new tokens
    (``x`` [B,S,...]) at M-RoPE ``positions`` [3,B,S] on caches holding ``cache_length`` [B] entries: (cos, sin,
    rows, seqlens, total). The tables hold the call's B*S tokens' angles (row b*S + s: token s of row b, read
    through ``rows`` [B,S]: the kernel's ``position_ids``), then zeros up to the longest row's entry count (the
    kernel wants at least that many rows; it reads only those at ``rows``); ``seqlens`` [B] int32 and ``total``
    (int32 scalar): the rows' entry counts after the call, minus one, and the largest."""
    from onnx import TensorProto

    shape = g.op("Shape", [x])
    batch = g.op("Gather", [shape, g.const("zero", 0)])
    s = g.op("Gather", [shape, g.const("one", 1)])
    tokens = g.op("Mul", [batch, s])
    angles = rotary_angles(g, positions, inv_freq, half, section, interleaved)  # [B*S, half]
    rows = g.op("Reshape", [g.op("Range", [g.const("zero", 0), tokens, g.const("one", 1)]),
                            g.op("Concat", [g.op("Unsqueeze", [batch, g.const("axis_0", [0])]),
                                            g.op("Unsqueeze", [s, "axis_0"])], axis=0)])  # [B, S]
    after = g.op("Add", [cache_length, s])  # [B]
    seqlens = g.op("Cast", [g.op("Sub", [after, g.const("one_1", [1])])], to=TensorProto.INT32)
    most = g.op("ReduceMax", [after], keepdims=0)
    short = g.op("Unsqueeze", [g.op("Max", [g.op("Sub", [most, tokens]), "zero"]), "axis_0"])
    pads = g.op("Concat", [g.const("pads_begin", [0, 0]), short, g.const("pads_last", [0])], axis=0)
    cos, sin = (g.op("Pad", [g.op(f, [angles]), pads]) for f in ("Cos", "Sin"))
    return cos, sin, rows, seqlens, g.op("Cast", [most], to=TensorProto.INT32)


def attention(g: GraphBuilder, q: str, k: str, v: str, rows: str, cos: str, sin: str, past: tuple[str, str],
              new: tuple[str, str], mask: str, heads: int, kv: int, head_dim: int) -> str:
    """A layer's grouped-query attention, as the exported graph computes it: q [1,S,heads*hd] and k [1,S,kv*hd]
    rotated by ``RotaryEmbedding`` (tables ``cos``/``sin`` [S, hd/2] read at ``rows`` [1,S]), the new entries
    written to the outputs ``new`` (key, value [1,S,kv,hd]; ``v`` any shape holding them), appended to ``past``
    [1,P,kv,hd], and the query heads of each kv group attending over them with the additive ``mask`` [S,T].
    Returns the heads' output [1,S,heads*hd]."""
    groups = heads // kv
    q = g.op("RotaryEmbedding", [q, rows, cos, sin], domain="com.microsoft", num_heads=heads, interleaved=0)
    k = g.op("RotaryEmbedding", [k, rows, cos, sin], domain="com.microsoft", num_heads=kv, interleaved=0)
    entries = g.const("shape_entries", [1, -1, kv, head_dim])
    g.op("Reshape", [k, entries], [new[0]])
    g.op("Reshape", [v, entries], [new[1]])
    keys = g.op("Concat", [past[0], new[0]], axis=1)  # [1, T, kv, hd]
    values = g.op("Concat", [past[1], new[1]], axis=1)
    kt = g.op("Unsqueeze", [g.op("Transpose", [keys], perm=[0, 2, 3, 1]), g.const("axis_2", [2])])
    vt = g.op("Unsqueeze", [g.op("Transpose", [values], perm=[0, 2, 1, 3]), "axis_2"])
    qg = g.op("Transpose", [g.op("Reshape", [q, g.const("shape_groups", [1, -1, kv, groups, head_dim])])],
              perm=[0, 2, 3, 1, 4])  # [1, kv, groups, S, hd]
    scale = g.const("scale", head_dim**-0.5, np.float32)
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [qg, kt]), scale]), mask])  # [1, kv, groups, S, T]
    out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), vt])
    return g.op("Reshape", [g.op("Transpose", [out], perm=[0, 3, 1, 2, 4]),
                            g.const("shape_attn", [1, -1, heads * head_dim])])


def grouped_query_attention(g: GraphBuilder, qkv: list[str], cos: str, sin: str, cache: tuple[str, str],
                            present: tuple[str, str], seqlens: str, total: str, heads: int, kv: int,
                            rows: str) -> str:
    """A layer's attention over a head-major cache in ONNX Runtime's ``GroupQueryAttention``, rotary included, for
    B rows of S new tokens: ``qkv`` is [q, k, v] ([B,S,heads*hd], [B,S,kv*hd] twice) or [the three packed,
    [B,S,(heads+2kv)*hd]]; the kernel rotates q and k of token s of row b with row ``rows``[b, s] of ``cos``/``sin``
    (``gqa_inputs``). ``cache`` (key, value [B,kv,capacity,hd]): row b holds ``seqlens``[b] + 1 - S entries before
    the new ones, and the outputs ``present`` are the same buffers when the caller binds them to the same memory:
    the kernel writes each row's S new entries at that offset in place and each query attends causally over what
    precedes it in its row, so nothing of the past is copied. Returns [B, S, heads*hd]."""
    inputs = [*qkv, *([""] * (3 - len(qkv))), cache[0], cache[1], seqlens, total, cos, sin, rows]
    out, _, _ = g.op("GroupQueryAttention", inputs, [g.name("attention"), *present], domain="com.microsoft",
                     num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0)
    return out


def silu_gate(g: GraphBuilder, gate: str, up: str) -> str:
    """silu(gate) * up."""
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])


def run_bound(session, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], device) -> None:
    """Run ``session`` reading and writing the tensors in place (IO binding by address)."""
    session.run_with_iobinding(bind(session, inputs, outputs, device))


def bind(session, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], device):
    """An IO binding of ``session`` to the tensors' memory (by address: a later run reads what they hold then)."""
    return rebind(session.io_binding(), inputs, outputs, device)


def rebind(io, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], device):
    """``io`` with these names (re)bound to the tensors' memory; its other bindings stay as they were."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    for name, t in inputs.items():
        io.bind_input(name, kind, device.index or 0, NP_TYPES[t.dtype], list(t.shape), t.data_ptr())
    for name, t in outputs.items():
        io.bind_output(name, kind, device.index or 0, NP_TYPES[t.dtype], list(t.shape), t.data_ptr())
    return io
