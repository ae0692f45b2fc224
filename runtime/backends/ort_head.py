"""The head's base forward (last decoder layer, final norm, LM head) as one ONNX Runtime graph, for the ort
backend on CPU wherever nothing needs the head to be differentiable.

The PyTorch head stays the one V-Reason's updates backpropagate through (autograd); requests without a
controller, V-Reason's steps between updates and the recompute after each (they read the cache, which holds
the injected values, as it is: ``Loop.head_step``), run this graph. An update takes the token's logits from
this graph as its LM head's output and runs only the last layer again in PyTorch (``Head.forward(logits=...)``):
the LM head's forward runs once, here; its backward is the quantized head's transposed copy or, for a float
LM head, ``DenseInputGrad``. Without this graph, a decode step on the ort backend would leave ONNX
Runtime after the trunk and run about 30 small PyTorch ops plus one ONNX Runtime call per quantized linear
(seven for the layer, one for the LM head); here the same math is one session run, in ONNX Runtime's fused
CPU operators (SimplifiedLayerNormalization for RMSNorm, RotaryEmbedding, MatMulNBits for quantized linears).
The graph is built at load from the head's own modules, so nothing is added to the export:

- float weights are graph inputs bound to the PyTorch head's tensors (no copy: one copy of each weight), or,
  where requests are decoded together (``packed``), initializers ONNX Runtime keeps prepacked (a second copy, in
  its own layout): a bound weight is packed again at every run of more than one row, and a one-row run of it
  takes another kernel, whose rounding differs from the packed one's, where a prepacked weight's rows come out
  the same whatever the number of rows (``OrtBackend.pool_min_rows``);
- quantized linears are MatMulNBits over the head's own codes and scales, handed to ONNX Runtime as they lie
  (``models.quantized.handed_session``; it keeps only its repacked form, as the head's per-linear sessions do);
- the rotary tables are computed in the graph from the tokens' M-RoPE positions and the head's own
  ``rotary`` (its frequencies and either family's axis rule, as the fused trunk computes them), as
  RotaryEmbedding's cos/sin caches read at rows 0..S-1; the causal mask is an input (S > 1: a prefill chunk).

Inputs: hidden [1,S,H], position_ids [3,1,S], mask [S,P+S] (additive), past_key/past_value
[1,P,kv,hd]; outputs: logits [1,V] of the last position, their entropy [1,1] and greedy pick [1] (what the
decode loop takes from them, without its own PyTorch ops: ``OrtHead.picked``), key/value [1,S,kv,hd] (the
layer's new entries, bound straight into the cache). Same numbers as the PyTorch head to float rounding
(``tests/test_ort_head``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.quantized import IR_VERSION, QuantLinear, handed_session, matmul_nbits
from runtime.backends.ort_graph import (
    GraphBuilder,
    attention,
    bind,
    gqa_inputs,
    grouped_query_attention,
    rebind,
    rotary_angles,
    run_bound,
    silu_gate,
)
from runtime.cache import KVCache
from runtime.pool import kept_for_rows, row_inputs

_FLOAT_MIN = float(torch.finfo(torch.float32).min)


def supported(head, dtype: torch.dtype, device) -> str | None:
    """Why ``OrtHead`` cannot run this head (None: it can)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return "fp32 on CPU only"
    layer = head.layer
    attn, mlp = layer.self_attn, layer.mlp
    if attn.qkv_proj is not None or mlp.gate_up_proj is not None:
        return "fused projections"
    if mlp.act is not nn.functional.silu:
        return "the MLP activation is not silu"
    for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
              head.lm_head):
        if isinstance(m, QuantLinear):
            if m.codes is None or m.in_features % m.block_size:
                return "quantized weights without MatMulNBits codes"
        elif not isinstance(m, nn.Linear):
            return f"unsupported linear {type(m).__name__}"
    return None


class _Graph(GraphBuilder):
    """The head graph: its inputs and the weights bound to them, over the shared node builder."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list = []
        self.handed: dict[str, torch.Tensor] = {}  # the quantized linears' codes and scales (``handed_session``)
        self.bound: dict[str, torch.Tensor] = {}  # weight inputs -> the PyTorch tensors bound to them

    def weight(self, name: str, t: torch.Tensor) -> str:
        """A float weight as a graph input bound to ``t`` at run time (ONNX Runtime reads the tensor in place)."""
        from onnx import TensorProto

        t = t.detach()
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous")
        self.bound[name] = t
        self.inputs.append(self.helper.make_tensor_value_info(name, TensorProto.FLOAT, list(t.shape)))
        return name

    def linear(self, x: str, m, name: str, out: str | None = None, packed: bool = False) -> str:
        """x [M, K] -> [M, N] for an nn.Linear (weight [N, K], read in place; a column-major weight, as the
        CPU head's LM head is stored, is read as the [K, N] matrix it is) or a QuantLinear (MatMulNBits); ``out``
        names the result (a graph output written by the matmul itself, without a copy). ``packed``: a float
        weight handed to ONNX Runtime as an initializer, which it keeps prepacked (a second copy of the weight,
        in its own layout) instead of packing it again at every run of more than one row."""
        y = out if m.bias is None and out is not None else self.name("linear")
        if isinstance(m, QuantLinear):
            node, arrays = matmul_nbits(x, y, f"{name}.", *m.nbits_args())
            self.nodes.append(node)
            self.handed.update(arrays)
        else:
            w = m.weight.detach()
            column_major = w.t().is_contiguous() and not w.is_contiguous()
            weight, kind = (w.t(), "weight_t") if column_major else (w, "weight")
            if packed:
                self.handed[f"{name}.{kind}"] = weight
                held = f"{name}.{kind}"
            else:
                held = self.weight(f"{name}.{kind}", weight)
            if column_major:
                self.op("MatMul", [x, held], [y])
            else:
                self.op("Gemm", [x, held], [y], transB=1)
        if m.bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", m.bias)], [out] if out is not None else 1)
        return y

    def rms(self, x: str, norm, name: str) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.weight(f"{name}.weight", norm.weight)], axis=-1,
                       epsilon=float(norm.eps))


def build(head, head_major: bool = False, packed: bool = False
          ) -> tuple[object, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The head graph (an onnx ModelProto), the PyTorch tensors its weight inputs are bound to, and the ones
    its quantized initializers are (named in the graph, handed over by ``handed_session``). ``head_major``: the
    form over a head-major cache with a batch axis (see the module docstring); ``packed``: float weights (the
    layer's linears and the LM head) kept prepacked by ONNX Runtime (``_Graph.linear``)."""
    from onnx import TensorProto, helper

    layer = head.layer
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv, hd = attn.heads, attn.kv_heads, attn.head_dim
    hidden_size = attn.q_proj.in_features
    vocab = head.lm_head.out_features
    g = _Graph()
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    if head_major:
        g.inputs += [helper.make_tensor_value_info("hidden", f, ["B", "S", hidden_size]),
                     helper.make_tensor_value_info("position_ids", i64, [3, "B", "S"]),
                     helper.make_tensor_value_info("cache_length", i64, ["B"]),
                     helper.make_tensor_value_info("cache_key", f, ["B", kv, "capacity", hd]),
                     helper.make_tensor_value_info("cache_value", f, ["B", kv, "capacity", hd])]
    else:
        g.inputs += [helper.make_tensor_value_info("hidden", f, [1, "S", hidden_size]),
                     helper.make_tensor_value_info("position_ids", i64, [3, 1, "S"]),
                     helper.make_tensor_value_info("mask", f, ["S", "T"]),
                     helper.make_tensor_value_info("past_key", f, [1, "P", kv, hd]),
                     helper.make_tensor_value_info("past_value", f, [1, "P", kv, hd])]
    rows_of = g.op("Slice", [g.op("Shape", ["hidden"]), g.const("start_0", [0]), g.const("end_2", [2])])  # [B, S]

    def per_row(x: str, *dims: int) -> str:
        """x reshaped to [B, S, *dims]."""
        return g.op("Reshape", [x, g.op("Concat", [rows_of, g.const(f"dims_{'_'.join(map(str, dims))}", dims)],
                                        axis=0)])

    x = g.op("Reshape", ["hidden", g.const("shape_rows", [-1, hidden_size])])  # [B*S, H]
    a = g.rms(x, layer.input_layernorm, "layer.input_layernorm")
    q = per_row(g.linear(a, attn.q_proj, "layer.self_attn.q_proj", packed=packed), heads * hd)  # [B, S, heads*hd]
    k = per_row(g.linear(a, attn.k_proj, "layer.self_attn.k_proj", packed=packed), kv * hd)
    v = per_row(g.linear(a, attn.v_proj, "layer.self_attn.v_proj", packed=packed), kv * hd)
    if attn.q_norm is not None:  # Qwen3-VL: RMSNorm over head_dim on q and k before the rotary embedding
        q = per_row(g.rms(per_row(q, heads, hd), attn.q_norm, "layer.self_attn.q_norm"), heads * hd)
        k = per_row(g.rms(per_row(k, kv, hd), attn.k_norm, "layer.self_attn.k_norm"), kv * hd)
    rot = head.rotary
    inv_freq = g.const("inv_freq", rot.inv_freq.detach().cpu().numpy(), np.float32)
    if head_major:
        cos, sin, rows, seqlens, total = gqa_inputs(g, "hidden", "position_ids", "cache_length", inv_freq, hd // 2,
                                                    rot.section, rot.interleaved)
        out = grouped_query_attention(g, [q, k, v], cos, sin, ("cache_key", "cache_value"),
                                      ("present_key", "present_value"), seqlens, total, heads, kv, rows)
    else:
        angles = rotary_angles(g, "position_ids", inv_freq, hd // 2, rot.section, rot.interleaved)  # [S, hd/2]
        cos, sin = g.op("Cos", [angles]), g.op("Sin", [angles])
        s = g.op("Gather", [g.op("Shape", ["hidden"]), g.const("one", 1)])
        rows = g.op("Unsqueeze", [g.op("Range", [g.const("zero", 0), s, "one"]), g.const("axis_0", [0])])  # [1, S]
        out = attention(g, q, k, v, rows, cos, sin, ("past_key", "past_value"), ("key", "value"), "mask",
                        heads, kv, hd)  # [1, S, heads*hd]
    out = g.linear(g.op("Reshape", [out, g.const("shape_heads_flat", [-1, heads * hd])]), attn.o_proj,
                   "layer.self_attn.o_proj", packed=packed)
    x = g.op("Add", [x, out])
    m = g.rms(x, layer.post_attention_layernorm, "layer.post_attention_layernorm")
    gate = g.linear(m, mlp.gate_proj, "layer.mlp.gate_proj", packed=packed)
    up = g.linear(m, mlp.up_proj, "layer.mlp.up_proj", packed=packed)
    x = g.op("Add", [x, g.linear(silu_gate(g, gate, up), mlp.down_proj, "layer.mlp.down_proj", packed=packed)])
    last = g.op("Slice", [per_row(x, hidden_size), g.const("last_start", [-1]), g.const("last_end", [2**62]),
                          g.const("axis_1", [1])])  # each row's last position [B, 1, H]
    last = g.op("Reshape", [last, g.const("shape_last", [-1, hidden_size])])
    g.linear(g.rms(last, head.norm, "norm"), head.lm_head, "lm_head", out="logits", packed=packed)  # [B, V]
    # what the decode loop takes from every step's logits, per row: their entropy, H = log(sum e^z) -
    # sum(e^z z) / sum e^z with z = logits - max, and the greedy pick (first index of the largest, as torch.argmax)
    vocab_axis = g.const("axis_last", [-1])
    z = g.op("Sub", ["logits", largest_and_first(g, "logits", vocab, "top")])
    e = g.op("Exp", [z])
    total_e = g.op("ReduceSum", [e, vocab_axis], keepdims=1)
    g.op("Sub", [g.op("Log", [total_e]), g.op("Div", [g.op("ReduceSum", [g.op("Mul", [e, z]), vocab_axis],
                                                           keepdims=1), total_e])], ["entropy"])
    batch = "B" if head_major else 1
    outputs = [helper.make_tensor_value_info("logits", f, [batch, vocab]),
               helper.make_tensor_value_info("entropy", f, [batch, 1]),
               helper.make_tensor_value_info("top", i64, [batch])]
    if head_major:
        outputs += [helper.make_tensor_value_info(n, f, ["B", kv, "capacity", hd])
                    for n in ("present_key", "present_value")]
    else:
        outputs += [helper.make_tensor_value_info(n, f, [1, "S", kv, hd]) for n in ("key", "value")]
    graph = helper.make_graph(g.nodes, "head", g.inputs, outputs, list(g.consts.values()))
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 21),
                                                                          helper.make_opsetid("com.microsoft", 1)])
    return model, g.bound, g.handed


def largest_and_first(g: GraphBuilder, logits: str, vocab: int, top: str) -> str:
    """Each row's largest logit ([B, 1], returned) and the first index that holds it (``top``, [B]: what
    ``torch.argmax`` picks) of ``logits`` [B, vocab], in blocks (128 values, or the largest of 64, 32, 16 that
    divides the vocabulary): the largest of each block, the first block whose largest is the row's, the first index
    of the largest within that block. ONNX Runtime's ArgMax reads a row value by value: over the bench export's
    vocabulary (151,936), 4 rows, 2 cores, ReduceMax and ArgMax over whole rows took 322 us, these 61 us (one row:
    145 against 37; scratch script, medians of 5 x 300 runs). A vocabulary none of those divides takes ReduceMax
    and ArgMax over the whole row."""
    size = next((b for b in (128, 64, 32, 16) if vocab % b == 0), 0)
    if not size:
        g.op("ArgMax", [logits], [top], axis=1, keepdims=0)
        return g.op("ReduceMax", [logits, g.const("axis_last", [-1])], keepdims=1)
    blocks = g.op("Reshape", [logits, g.const("shape_pick_blocks", [0, vocab // size, size])])
    largest = g.op("ReduceMax", [blocks, g.const("axis_2", [2])], keepdims=0)  # [B, blocks]
    block = g.op("ArgMax", [largest], axis=1, keepdims=1)  # [B, 1]: ArgMax takes the first of equal values
    within = g.op("ArgMax", [g.op("GatherND", [blocks, block], batch_dims=1)], axis=1, keepdims=0)  # [B]
    start = g.op("Mul", [g.op("Squeeze", [block, g.const("axis_1", [1])]), g.const("pick_block", size)])
    g.op("Add", [start, within], [top])
    return g.op("ReduceMax", [largest, g.const("axis_last", [-1])], keepdims=1)


class OrtHead:
    """``head`` (a PyTorch ``Head``, fp32 on CPU) run through ONNX Runtime; see the module docstring.
    ``head_major``: over a head-major cache (the fused trunk's layout), with ``rows`` for a batch of requests."""

    def __init__(self, head, opts, head_major: bool = False, packed: bool = False) -> None:
        """``opts``: the session options (the ort backend's ``options``). ``packed``: see ``build``."""
        self.head = head
        self.head_major = head_major
        model, self.bound, handed = build(head, head_major, packed)
        self.session, self._handed = handed_session(model, handed, opts)
        self.vocab = head.lm_head.out_features
        self.logits = torch.empty(1, self.vocab)
        self.out = self.logits[0]  # the one tensor every one-request call returns (``picked`` knows it by it)
        self._entropy = torch.empty(1, 1)
        self._top = torch.empty(1, dtype=torch.long)
        self._entropy_np, self._top_np = self._entropy.numpy(), self._top.numpy()
        self._written = -1  # ``out``'s version counter when this graph last wrote it
        self._scratch = torch.empty(0)
        self._token: _Token | None = None  # the one-token binding, kept across calls
        self._rows: _Rows | None = None  # the last batch call's binding (``rows``; ``picked`` reads it)
        self._row_bindings: dict[tuple, _Rows] = {}  # one per number of rows, kept while the pool's buffers stay

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int,
                 write: bool = True) -> torch.Tensor:
        """Logits [V] of the last of ``hidden`` [1,S,H]'s tokens at ``positions`` [3,1,S] over ``layer``'s cache
        (the entries below ``cache.length``, or below ``cache.length - S`` for a recompute of tokens already
        cached: ``write`` off); with ``write``, the S new entries go into the cache at ``cache.length``."""
        if self.head_major:
            return self._head_major(hidden, positions, cache, layer, write)
        s = hidden.shape[1]
        length = cache.length if write else cache.length - s
        keys, values = cache.keys[layer][:, :length], cache.values[layer][:, :length]
        if write:
            new_k, new_v = cache.slot(layer, s)
        else:
            shape = (1, s, *keys.shape[2:])
            n = 2 * int(np.prod(shape))
            if self._scratch.numel() < n:
                self._scratch = torch.empty(n)
            new_k, new_v = self._scratch[:n].view(2, *shape).unbind(0)
        past = {"past_key": keys, "past_value": values}
        new = {"key": new_k, "value": new_v}
        if s == 1:  # a decode step or its recompute: the kept binding, with what moved bound again
            t = self._token
            if t is None:
                t = self._token = _Token(hidden)
                t.io = bind(self.session, {"hidden": t.hidden, "position_ids": t.positions, **self.bound},
                            self._outputs(), "cpu")
            t.hidden.copy_(hidden)
            t.positions.copy_(positions)
            rebind(t.io, {**past, "mask": t.mask(length + 1)}, new, "cpu")
            self.session.run_with_iobinding(t.io)
        else:
            j = torch.arange(length + s).unsqueeze(0)
            mask = torch.zeros(s, length + s).masked_fill_(j > torch.arange(s).unsqueeze(1) + length, _FLOAT_MIN)
            inputs = {"hidden": hidden.contiguous(), "position_ids": positions.contiguous(), "mask": mask, **past,
                      **self.bound}
            run_bound(self.session, inputs, {**self._outputs(), **new}, "cpu")
        self._written = self.out._version  # a write through PyTorch after this would move it on
        return self.out

    def _head_major(self, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int,
                    write: bool) -> torch.Tensor:
        """One request over its head-major cache: the kernel writes the S entries at the length in place (a
        recompute writes the current token's entries again, the same numbers: the cache keeps what it held)."""
        s = hidden.shape[1]
        if write:
            cache.room(s)
        k, v = cache.storage(layer)
        length = torch.tensor([cache.length if write else cache.length - s])
        inputs = {"hidden": hidden.contiguous(), "position_ids": positions.contiguous(), "cache_length": length,
                  "cache_key": k, "cache_value": v, **self.bound}
        run_bound(self.session, inputs, {**self._outputs(), "present_key": k, "present_value": v}, "cpu")
        self._written = self.out._version
        return self.out

    def rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        """One decode step of several requests in one run (the engine's batched call, ``runtime.engine.Call``):
        ``calls`` are (hidden [1,1,H], positions [3,1,1], cache[, write]) with every cache a row of one ``KVPool``;
        each token's entries go into its cache at its length (``write`` False: a recompute of the token last
        cached, its entries written again at length - 1). Returns each request's logits [V], a view of this
        graph's batch output (read before the next batched call; ``picked`` knows them). The run covers the pool's
        rows up to the last one a request holds (``KVPool.span``, as the fused trunk's run): a row without a call
        (a request prefilling, or a free row) gets a zero token written at its length, where nothing is read and
        its own next write lands."""
        pool = calls[0][2].pool
        n = pool.span  # the rows up to the last one a request holds, as the fused trunk's call covers
        t = self.batch(pool, n)
        hidden, positions, index, _ = row_inputs(calls, torch.float32, "cpu", rows=n)
        t.hidden.copy_(hidden)
        t.positions.copy_(positions)
        t.length.copy_(index)
        return self.run_rows(t, [call[2].row for call in calls])

    def batch(self, pool, n: int) -> _Rows:
        """The batch binding over ``pool``'s first ``n`` rows (kept while the pool's buffers stay)."""
        return kept_for_rows(self._row_bindings, pool, n, lambda: _Rows(self, pool, n))

    def run_rows(self, t: _Rows, rows: list[int]) -> list[torch.Tensor]:
        """Run batch binding ``t`` as its inputs stand; the logits [V] of ``rows`` (views ``picked`` knows)."""
        self.session.run_with_iobinding(t.io)
        self._rows = t
        t.written = t.logits._version
        t.out = [t.row_logits[r] for r in rows]
        return t.out

    def _outputs(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits, "entropy": self._entropy, "top": self._top}

    def picked(self, logits: torch.Tensor) -> tuple[float, int] | None:
        """(entropy, greedy token) of ``logits``, computed in the graph with them, if they are one of this graph's
        last outputs as it left them; None for any other tensor (``Loop.pick``). Read through numpy: a step's few
        PyTorch ops between the graph runs cost 10-20 us each there, against about 3 with warm caches (the weights'
        reads evict them; measured on the bench int4 export, 2 cores, 4 rows: docs/benchmarks.md)."""
        if logits is self.out:
            if logits._version != self._written:
                return None
            return float(self._entropy_np[0, 0]), int(self._top_np[0])
        t = self._rows
        if t is None or t.logits._version != t.written:
            return None
        row = t.row_of.get(id(logits))
        if row is None or not any(out is logits for out in t.out):
            return None
        return float(t.entropy_np[row, 0]), int(t.top_np[row])


class _Rows:
    """``OrtHead.rows``' binding over one pool's buffers: its first ``n`` rows, its own input and output buffers."""

    def __init__(self, graph: OrtHead, pool, n: int) -> None:
        h = graph.head.layer.self_attn.q_proj.in_features
        self.hidden = torch.zeros(n, 1, h)
        self.positions = torch.zeros(3, n, 1, dtype=torch.long)
        self.length = torch.zeros(n, dtype=torch.long)
        self.logits = torch.empty(n, graph.vocab)
        self.entropy = torch.empty(n, 1)
        self.top = torch.empty(n, dtype=torch.long)
        self.written = -1
        self.out: list[torch.Tensor] = []  # the last run's requests' logits
        self.row_logits = [self.logits[r] for r in range(n)]  # each row's logits [V], made once
        self.row_of = {id(x): r for r, x in enumerate(self.row_logits)}
        # numpy views, for the batched decode step's inputs and the picks (``OrtBackend.decode_rows``, ``picked``)
        self.hidden_np, self.positions_np, self.length_np = self.hidden.numpy(), self.positions.numpy(), \
            self.length.numpy()
        self.entropy_np, self.top_np = self.entropy.numpy(), self.top.numpy()
        k, v = pool.keys[-1][:n], pool.values[-1][:n]  # the head's layer: the cache's last
        self.io = bind(graph.session, {"hidden": self.hidden, "position_ids": self.positions,
                                       "cache_length": self.length, "cache_key": k, "cache_value": v, **graph.bound},
                       {"logits": self.logits, "entropy": self.entropy, "top": self.top, "present_key": k,
                        "present_value": v}, "cpu")


class DenseInputGrad:
    """``grad @ W`` for a float linear's weight W [N, K] (the LM head's, in V-Reason's backward, where the
    logits came from the head graph: ``layers.given_output``), as one ONNX Runtime Gemm reading the PyTorch
    weight in place (bound as an input: no copy, nothing prepacked). PyTorch runs this matrix-vector product on
    one core whatever its thread setting; measured on the bench export's LM head (151936 x 896, column-major as
    ``Head.prefer_column_major_lm_head`` stores it): 24 ms in PyTorch on one or two threads, 11-13 ms here on
    two. For several rows (requests updated together, ``VReason.update_rows``) of a column-major weight it computes
    the transposed product, ``W^T grad^T``, where the weight is the Gemm's first operand, read as it lies, and the
    small gradient the second, which ONNX Runtime's kernel packs: taking the weight as the second operand, it
    would pack the whole weight at every call (measured on that LM head, 2 cores: 2 and 4 rows 21 ms that way,
    13.5-15 ms transposed; one row 13 ms as it was, 15 transposed)."""

    def __init__(self, weight: torch.Tensor, opts) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        w = weight.detach()
        n, k = w.shape
        self.k = k
        if w.is_contiguous():  # [N, K] as it lies: grad [M, N] @ W
            self.weight, trans = w, 0
        elif w.t().is_contiguous():  # column-major: its storage is W^T [K, N], read transposed
            self.weight, trans = w.t(), 1
        else:
            raise ValueError("the weight is neither row- nor column-major")
        f = TensorProto.FLOAT

        def session(a: str, b: str, trans_b: int, out: list):
            g = GraphBuilder()
            g.op("Gemm", [a, b], ["out"], transB=trans_b)
            graph = helper.make_graph(g.nodes, "input_grad", [helper.make_tensor_value_info("grad", f, ["M", n]),
                                                              helper.make_tensor_value_info("weight", f,
                                                                                            list(self.weight.shape))],
                                      [helper.make_tensor_value_info("out", f, out)])
            model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 21)])
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        self.session = session("grad", "weight", trans, ["M", k])
        # several rows of a column-major weight: out^T [K, M] = W^T [K, N] (as it lies) @ grad^T
        self.rows_session = session("weight", "grad", 1, [k, "M"]) if trans else None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        rows = grad.detach().reshape(-1, grad.shape[-1]).float().contiguous()
        if rows.shape[0] > 1 and self.rows_session is not None:
            out_t = torch.empty(self.k, rows.shape[0])
            run_bound(self.rows_session, {"grad": rows, "weight": self.weight}, {"out": out_t}, "cpu")
            out = out_t.t()
        else:
            out = torch.empty(rows.shape[0], self.k)
            run_bound(self.session, {"grad": rows, "weight": self.weight}, {"out": out}, "cpu")
        return out.reshape(*grad.shape[:-1], out.shape[-1]).to(grad.dtype)


class _Token:
    """``OrtHead``'s buffers for one-token calls: bound once, refilled per call (binding the head's ~20 tensors
    afresh cost about 0.3 ms a step on the bench export)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = torch.empty(1, 1, hidden.shape[2])
        self.positions = torch.zeros(3, 1, 1, dtype=torch.long)  # the token's M-RoPE position
        self.zeros = torch.zeros(1, 0)  # the additive mask: nothing hidden from the one query
        self.io = None

    def mask(self, n: int) -> torch.Tensor:
        if self.zeros.shape[1] < n:
            self.zeros = torch.zeros(1, max(n, 2 * self.zeros.shape[1]))
        return self.zeros[:, :n]
