"""The head's base forward as an ONNX Runtime graph (``runtime.backends.ort_head``): the same logits and cache
entries as the PyTorch head for decode steps, prefill chunks and recomputes, on both families, float and
quantized weights; and the ort backend's base requests run through it with the answers of the PyTorch head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controller.vreason import entropy, switching_loss
from models import load_model
from models.quantized import QuantLinear, rtn_quantize
from runtime import generate
from runtime.backends.ort import options
from runtime.backends.ort_graph import GraphBuilder
from runtime.backends.ort_head import DenseInputGrad, OrtHead, largest_and_first, supported
from runtime.cache import KVCache
from runtime.reasoner import Reasoner

QUESTION = "Which way does the red circle move?"


def quantize_head(head, bits: int, block: int = 32) -> None:
    """Every linear of the head's layer and its LM head as a QuantLinear (ONNX Runtime's rounding)."""
    def q(m):
        return QuantLinear(m.in_features, m.out_features, bits, block, {**rtn_quantize(m.weight, bits, block),
                                                                         "bias": m.bias})
    attn, mlp = head.layer.self_attn, head.layer.mlp
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj",
                                                                                  "down_proj"))):
        for n in names:
            setattr(owner, n, q(getattr(owner, n)))
    head.lm_head = q(head.lm_head)


@pytest.fixture(params=["gqa2-rows", "gqa4-columns", "qwen3-columns", "gqa2-int4", "gqa4-int8", "gqa2-rows-hm",
                        "qwen3-columns-hm", "gqa4-int4-hm"])
def heads(request, checkpoints, q3_tiny):
    """(PyTorch head, its ORT graph): both families, the LM head row- or column-major, quantized linears; over a
    token-major cache (the mask form) or a head-major one (``-hm``: GroupQueryAttention, the fused trunk's layout)."""
    name, form, *layout = request.param.split("-")
    return make_head(checkpoints, q3_tiny, name, form, bool(layout))


def make_head(checkpoints, q3_tiny, name: str, form: str, head_major: bool):
    head = load_model(q3_tiny if name == "qwen3" else checkpoints[name]).head.eval()
    if form == "columns":
        head.prefer_column_major_lm_head()
    elif form in ("int4", "int8"):
        quantize_head(head, int(form[3:]))
    assert supported(head, torch.float32, "cpu") is None
    return head, OrtHead(head, options(), head_major=head_major)


def filled_cache(head, length: int, capacity: int, seed: int, head_major: bool = False) -> KVCache:
    attn = head.layer.self_attn
    cache = KVCache.allocate(1, capacity, attn.kv_heads, attn.head_dim, torch.float32, "cpu", head_major=head_major)
    g = torch.Generator().manual_seed(seed)
    cache.keys[0][:, :length] = torch.randn(1, length, attn.kv_heads, attn.head_dim, generator=g)
    cache.values[0][:, :length] = torch.randn(1, length, attn.kv_heads, attn.head_dim, generator=g)
    cache.length = length
    return cache


def positions(s: int, start: int) -> torch.Tensor:
    """M-RoPE positions whose three axes differ (as a video token's do)."""
    p = torch.arange(start, start + s)
    return torch.stack((p, p + 3, 2 * p + 1)).view(3, 1, s)


@pytest.mark.parametrize("s,past", [(1, 37), (1, 0), (6, 20), (9, 0)])
def test_graph_equals_the_pytorch_head(heads, s, past):
    head, graph = heads
    hidden = torch.randn(1, s, head.layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(s))
    pos = positions(s, past + 5)
    cache = filled_cache(head, past, past + s + 4, seed=past, head_major=graph.head_major)
    with torch.no_grad():
        ref, k, v = head(hidden, pos, cache.keys[0][:, :past], cache.values[0][:, :past], last_only=True)
    logits = graph(hidden, pos, cache, 0).clone()
    scale = ref.abs().max().item()
    assert (logits - ref[0, -1]).abs().max().item() <= 1e-5 * max(scale, 1)
    assert torch.allclose(cache.keys[0][:, past:past + s], k, atol=1e-5)  # written into the cache slot
    assert torch.allclose(cache.values[0][:, past:past + s], v, atol=1e-5)
    assert torch.equal(cache.keys[0][:, past + s:], torch.zeros_like(cache.keys[0][:, past + s:]))
    # a recompute of the tokens just written (``write`` off): the same logits, nothing written
    cache.length = past + s
    before = cache.keys[0].clone()
    again = graph(hidden, pos, cache, 0, write=False)
    assert torch.allclose(again, logits, atol=1e-6) and torch.equal(cache.keys[0], before)


def test_the_graph_picks_what_the_loop_would(heads):
    """The entropy and greedy token the graph computes with its logits equal the loop's own (controller entropy,
    torch.argmax); they are handed out only for the graph's own output, untouched since it wrote it."""
    head, graph = heads
    hidden = torch.randn(1, 1, head.layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(3))
    logits = graph(hidden, positions(1, 30), filled_cache(head, 25, 30, seed=4, head_major=graph.head_major), 0)
    h, top = graph.picked(logits)
    assert abs(h - entropy(logits).item()) <= 1e-5 * max(1.0, entropy(logits).item())
    assert top == int(logits.argmax()) and type(h) is float and type(top) is int
    assert graph.picked(logits.clone()) is None  # not the graph's output
    logits[top] -= 100.0  # written through PyTorch after the graph: its picks no longer describe it
    assert graph.picked(logits) is None


@pytest.mark.parametrize("vocab", [151936, 320, 1000])
def test_the_pick_in_blocks_is_torchs_argmax_and_max(vocab):
    """``largest_and_first`` (in blocks of 128 for the bench vocabulary, of 64 for the tiny one's, over whole rows
    for a vocabulary no block divides) gives each row's largest logit and torch.argmax's index: the first of equal
    largest values, whether they lie in one block or in several, and in a row of equal values."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from models.quantized import IR_VERSION

    g = GraphBuilder()
    largest = largest_and_first(g, "logits", vocab, "top")
    g.op("Identity", [largest], ["largest"])
    graph = helper.make_graph(g.nodes, "pick", [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                              ["B", vocab])],
                              [helper.make_tensor_value_info("top", TensorProto.INT64, ["B"]),
                               helper.make_tensor_value_info("largest", TensorProto.FLOAT, ["B", 1])],
                              list(g.consts.values()))
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), options(2))
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)) * 4 - 50
    logits[1, [vocab - 1, 7, vocab // 2]] = 9.0  # equal largest in three blocks: the first index wins
    logits[2, [70, 65]] = 9.0  # two in one block
    logits[3] = -2.0  # every value equal: index 0
    logits[4, vocab - 1] = 9.0  # the very last
    logits[5, 0] = 9.0  # the very first
    top, largest = session.run(None, {"logits": logits.numpy()})
    assert top.tolist() == logits.argmax(dim=1).tolist() == [top[0], 7, 65, 0, vocab - 1, 0]
    assert np.array_equal(largest[:, 0], logits.amax(dim=1).numpy())


@pytest.mark.parametrize("name,form", [("gqa2", "rows"), ("qwen3", "columns"), ("gqa4", "int4")])
def test_rows_of_a_pool_in_one_call_equal_each_alone(checkpoints, q3_tiny, name, form):
    """The head-major form's batched call (``OrtHead.rows``): requests whose caches are rows of one pool, of
    different lengths, one token each, with a row left out (prefilling): each row's logits, pick and new entries
    are those of the row's call alone; the row left out keeps every entry below its length."""
    from runtime.pool import KVPool

    head, graph = make_head(checkpoints, q3_tiny, name, form, head_major=True)
    attn = head.layer.self_attn
    pool = KVPool(1, attn.kv_heads, attn.head_dim, torch.float32, "cpu")
    g = torch.Generator().manual_seed(7)
    caches = []
    for length in (29, 3, 17, 11):
        c = pool.acquire(length + 2)
        c.keys[0][:, :length] = torch.randn(1, length, attn.kv_heads, attn.head_dim, generator=g)
        c.values[0][:, :length] = torch.randn(1, length, attn.kv_heads, attn.head_dim, generator=g)
        c.length = length
        caches.append(c)
    out = caches.pop(2)  # a row without a call
    kept = out.keys[0][:, :out.length].clone()
    hidden = [torch.randn(1, 1, attn.q_proj.in_features, generator=g) for _ in caches]
    pos = [positions(1, c.length + 4) for c in caches]
    before = [(c.keys[0].clone(), c.values[0].clone()) for c in caches]
    got = graph.rows(list(zip(hidden, pos, caches)))
    picks = [graph.picked(x) for x in got]
    got = [x.clone() for x in got]
    after = [(c.keys[0].clone(), c.values[0].clone()) for c in caches]
    assert torch.equal(out.keys[0][:, :out.length], kept)
    for c, h, p, (k0, v0), (k1, v1), logits, (ent, top) in zip(caches, hidden, pos, before, after, got, picks):
        c.keys[0].copy_(k0)
        c.values[0].copy_(v0)
        alone = graph(h, p, c, 0).clone()
        assert (logits - alone).abs().max().item() <= 1e-5 * max(alone.abs().max().item(), 1)
        assert top == int(alone.argmax()) and abs(ent - entropy(alone).item()) <= 1e-5
        assert torch.allclose(c.keys[0], k1, atol=1e-6) and torch.allclose(c.values[0], v1, atol=1e-6)


def test_an_update_from_the_graphs_logits_has_the_pytorch_heads_gradient(heads):
    """V-Reason's backward on the ort backend: the LM head's output comes from the graph and only the last layer
    runs again in PyTorch (``Head.forward(logits=...)``), the gradient through the LM head from its input gradient
    (a quantized head's transposed copy, or ``DenseInputGrad`` for a float one), against autograd through the
    whole PyTorch head. A quantized LM head never runs forward in PyTorch then (no session of its own for it)."""
    head, graph = heads
    past = 21
    hidden = torch.randn(1, 1, head.layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(7))
    pos = positions(1, past + 5)
    # the token's own entry at ``past``: a recompute
    cache = filled_cache(head, past + 1, past + 4, seed=9, head_major=graph.head_major)
    keys = cache.keys[0][:, :past]
    given = graph(hidden, pos, cache, 0, write=False).clone()
    quantized = isinstance(head.lm_head, QuantLinear)
    if not quantized:
        head.lm_head_input_grad = DenseInputGrad(head.lm_head.weight, options())

    def grad(logits=None):
        values = cache.values[0][:, :past].clone().requires_grad_(True)
        out, _, _ = head(hidden, pos, keys, values, last_only=True, logits=logits)
        switching_loss(out[0, -1], -1.0).backward()
        return out[0, -1].detach(), values.grad

    try:
        out, fast = grad(given)
        if quantized:
            assert "forward" not in head.lm_head._sessions  # the backward's session only
        ref_logits, ref = grad()
    finally:
        head.lm_head_input_grad = None
    assert torch.equal(out, given)
    assert (given - ref_logits).abs().max() <= 1e-5 * max(ref_logits.abs().max().item(), 1)
    assert ref.abs().max() > 0
    assert torch.allclose(fast, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_dense_input_grad_is_grad_times_the_weight(layout):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 48, generator=g)
    if layout == "columns":
        w = w.t().contiguous().t()
    dense = DenseInputGrad(w, options())
    for rows in (1, 2, 4):  # one request's gradient, or several updated together (the transposed product)
        grad = torch.randn(1, rows, 300, generator=g)
        got = dense(grad)
        assert got.shape == (1, rows, 48)
        assert torch.allclose(got, grad @ w, atol=1e-4)
    with pytest.raises(ValueError, match="row- nor column-major"):
        DenseInputGrad(torch.randn(8, 6)[:, ::2], options())


def test_what_the_graph_does_not_take(checkpoints):
    head = load_model(checkpoints["gqa2"]).head
    assert "fp32 on CPU" in supported(head, torch.float16, "cpu")
    head.layer.fuse_projections()
    assert supported(head, torch.float32, "cpu") == "fused projections"


@pytest.mark.parametrize("fixture", ["engine_dir", "int4_engine"])
def test_base_requests_on_ort_run_the_head_graph_with_the_pytorch_heads_answers(fixture, request, tmp_path,
                                                                                  monkeypatch):
    from models.samples import sample_video

    video = sample_video(tmp_path / "clip.mp4", seconds=1.5)
    r = Reasoner.load(request.getfixturevalue(fixture), backend="ort", reuse_mb=0)
    assert isinstance(r.backend.base_head, OrtHead)
    calls = []
    run = r.backend.base_head.session.run_with_iobinding
    r.backend.base_head.session.run_with_iobinding = lambda io: (calls.append(1), run(io))
    torch_entropies = []
    monkeypatch.setattr(generate, "entropy", lambda x: (torch_entropies.append(1), entropy(x))[1])
    fast = r.ask(video=str(video), question=QUESTION, max_new_tokens=10)
    assert len(calls) >= len(fast.token_ids) > 0  # prefill, the first logits and every decode step
    assert not torch_entropies  # every step's entropy and token came from the graph (OrtHead.picked)
    # the PyTorch head for the same request (each request alone, the batched head call off too)
    graph, rows, decode = r.backend.base_head, r.backend.head_rows, r.backend.decode_rows
    r.backend.base_head = r.backend.head_rows = r.backend.decode_rows = None
    slow = r.ask(video=str(video), question=QUESTION, max_new_tokens=10)
    assert fast.token_ids == slow.token_ids
    assert np.allclose(fast.entropy, slow.entropy, atol=1e-4)
    # V-Reason and Lite: their updates need the differentiable head; the steps between them (and the recompute
    # after an update) read the cache as it is, and run the graph
    lm_head = r.head.lm_head
    quantized = isinstance(lm_head, QuantLinear)
    for method in ("vreason", "vreason-lite"):
        r.backend.base_head, r.backend.head_rows, r.backend.decode_rows = graph, rows, decode
        calls.clear()
        lm_runs = []  # the LM head's own PyTorch-side calls: "forward", "backward" (a quantized one's sessions)
        if quantized:
            run_lm = lm_head._run
            lm_head._run = lambda which, x, runs=lm_runs, run=run_lm: (runs.append(which), run(which, x))[1]
        else:  # the update's backward through the float LM head runs in ONNX Runtime
            own = r.head.lm_head_input_grad
            assert isinstance(own, DenseInputGrad)
            r.head.lm_head_input_grad = lambda g, runs=lm_runs, run=own: (runs.append("backward"), run(g))[1]
        vr_fast = r.ask(video=str(video), question=QUESTION, max_new_tokens=6, method=method)
        updates = sum(1 for a in vr_fast.alpha if a != 0)
        # every token's logits, the updated ones included, came from the graph; the updates ran the last layer
        # in PyTorch with the graph's logits as the LM head's output, never the LM head's forward
        assert updates and len(calls) >= len(vr_fast.token_ids) + updates
        assert lm_runs == ["backward"] * updates
        if quantized:
            del lm_head._run
        else:
            r.head.lm_head_input_grad = own
        r.backend.base_head = r.backend.head_rows = r.backend.decode_rows = None
        vr_slow = r.ask(video=str(video), question=QUESTION, max_new_tokens=6, method=method)
        r.backend.base_head, r.backend.head_rows, r.backend.decode_rows = graph, rows, decode
        assert vr_fast.token_ids == vr_slow.token_ids and vr_fast.alpha == vr_slow.alpha
        assert np.allclose(vr_fast.entropy, vr_slow.entropy, atol=1e-4)

