"""The ORT-only form of the trunk graph (``runtime.backends.ort_trunk``): the hidden states and new cache entries
of the standard graph on both families, fp32 and int4, for prefill, a later chunk, decode and the fixed-capacity
(static) form, written in place into a head-major cache that is otherwise left untouched; the ort backend runs
it where it costs no memory (or when asked) and falls back where it cannot."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.exporter import export_model
from models.errors import UserError
from models.registry import family
from runtime.backends import ort_graph, ort_trunk
from runtime.backends.ort import OrtBackend, options
from runtime.backends.ort_graph import run_bound
from runtime.reasoner import Reasoner


@pytest.fixture(scope="module")
def exports(engine_dir, int4_engine, q3_engine, checkpoints, tmp_path_factory):
    """fp32 exports of three decoder shapes (GQA 4:2, GQA 4:1 with another M-RoPE split, Qwen3-VL with q/k
    norm, interleaved M-RoPE and DeepStack), and the int4 one."""
    root = tmp_path_factory.mktemp("ort-trunk")
    return {"gqa2": engine_dir, "int4": int4_engine,
            "gqa4": export_model(checkpoints["gqa4"], root / "gqa4", quiet=True),
            "qwen3": q3_engine}


def text_config(d):
    manifest = json.loads((d / "manifest.json").read_text())
    return family(manifest["model_type"]).Config.from_stored(manifest["config"]).text


def feeds(session, s: int, p: int, cache_length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            out[i.name] = rng.standard_normal((1, s, i.shape[2])).astype(np.float32)
        elif i.name == "position_ids":  # the three M-RoPE axes apart, as a video token's are
            t = np.arange(p, p + s)
            out[i.name] = np.stack([t, t // 2 + 1, 3 * t]).reshape(3, 1, s).astype(np.int64)
        elif i.name == "cache_length":
            out[i.name] = np.array([cache_length], np.int64)
        elif i.name.startswith("past_"):
            out[i.name] = rng.standard_normal((1, p, i.shape[2], i.shape[3])).astype(np.float32)
        elif i.name == "deepstack_embeds":
            out[i.name] = rng.standard_normal((i.shape[0], 1, s, i.shape[3])).astype(np.float32)
        else:
            raise AssertionError(f"unexpected trunk input {i.name}")
    return out


# (new tokens S, past entries P, valid past entries): decode, a chunk after a prefix, a prefill, and the
# static form (the whole fixed-capacity cache bound, its unfilled end masked by cache_length)
CASES = [(1, 23, 23), (7, 12, 12), (10, 0, 0), (1, 30, 17)]


def run_fused(session, f: dict, capacity: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(hidden, the head-major buffers [1,kv,capacity,hd] before the call, after it) of the fused form on the
    standard graph's feeds ``f``: each layer's past copied in, the rest of the buffer filled with noise that the
    attention must not read; each buffer bound as the input and the output, as the backend binds it."""
    rng = np.random.default_rng(seed)
    s = f["inputs_embeds"].shape[1]
    inputs = {k: torch.from_numpy(v) for k, v in f.items() if not k.startswith("past_")}
    outputs = {"hidden": torch.empty(1, s, f["inputs_embeds"].shape[2])}
    before = []
    for name in sorted(k for k in f if k.startswith("past_")):
        past = f[name]  # [1, P, kv, hd]
        buf = rng.standard_normal((1, past.shape[2], capacity, past.shape[3])).astype(np.float32)
        buf[:, :, : past.shape[1]] = past.transpose(0, 2, 1, 3)
        before.append(buf.copy())
        kind, layer = name[len("past_"):].split(".")
        inputs[f"cache_{kind}.{layer}"] = outputs[f"present_{kind}.{layer}"] = torch.from_numpy(buf)
    run_bound(session, inputs, outputs, "cpu")
    after = [inputs[f"cache_{n[len('past_'):]}"].numpy() for n in sorted(k for k in f if k.startswith("past_"))]
    return outputs["hidden"].numpy(), before, after


@pytest.mark.parametrize("name", ["gqa2", "gqa4", "qwen3", "int4"])
def test_fused_graph_equals_the_standard_graph(exports, name):
    d = exports[name]
    providers = ["CPUExecutionProvider"]
    # quantized matmuls in float on both sides (the runtime's int8 activations round apart under any 1e-7
    # difference, see export/sessions.py); the int4 weights are the same
    standard = ort.InferenceSession(str(d / "trunk.onnx"), options(accuracy_level=0), providers=providers)
    fused = ort_trunk.session(d / "trunk.onnx", text_config(d), options(accuracy_level=0), providers)
    nodes = __import__("onnx").load_from_string(ort_trunk.build(d / "trunk.onnx", text_config(d))).graph.node
    ops = {n.op_type for n in nodes}
    assert {"SkipSimplifiedLayerNormalization", "GroupQueryAttention"} <= ops and "Transpose" not in ops
    # nothing of the past is copied: the attention alone reads the cache
    assert {n.op_type for n in nodes for i in n.input if i.startswith(("cache_key.", "cache_value."))} \
        == {"GroupQueryAttention"}
    names = [o.name for o in standard.get_outputs()]
    for s, p, valid in CASES:
        f = feeds(standard, s, p, valid, seed=s + p)
        want = dict(zip(names, standard.run(None, f)))
        hidden, before, after = run_fused(fused, f, capacity=max(p, valid + s) + 3, seed=s)
        scale = max(1.0, np.abs(want["hidden"]).max())
        assert np.abs(want["hidden"] - hidden).max() <= 2e-5 * scale, (name, s, p)
        pasts = sorted(k for k in f if k.startswith("past_"))
        for key, b, a in zip(pasts, before, after):
            new = want[key[len("past_"):]].transpose(0, 2, 1, 3)  # [1, kv, S, hd]
            assert np.abs(a[:, :, valid:valid + s] - new).max() <= 2e-5 * max(1.0, np.abs(new).max()), (name, key)
            a[:, :, valid:valid + s] = b[:, :, valid:valid + s]
            assert np.array_equal(a, b), (name, key, "an entry besides the new ones changed")


def test_ort_backend_picks_the_trunk_graph(exports, monkeypatch):
    # exports keep the trunk's weights in trunk.onnx.data: "auto" runs the fused form, over a head-major cache
    # (the trunk's layers and the head's), the requests' caches rows of one pool, decoded together
    r = Reasoner.load(exports["qwen3"], backend="ort")
    assert r.backend.trunk_form == "fused" and r.backend.head_major_layers == r.backend.num_layers + 1 > 1
    assert r.backend.batch_rows and r.pool is not None and r.backend.base_head.head_major
    assert r.ask(question="What is shown?", max_new_tokens=3).token_ids
    r = Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="standard")
    assert r.backend.trunk_form == "standard" and r.backend.head_major_layers == 0
    assert r.pool is not None and not r.pool.head_major  # rows of a token-major pool, each row contiguous
    assert r.cache_for(8).keys[0].is_contiguous()
    with pytest.raises(UserError, match="expected auto, fused or standard"):
        Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="fast")

    def refuse(*a, **k):
        raise ort_trunk.Unsupported("a graph this module cannot restate")

    monkeypatch.setattr(ort_trunk, "build", refuse)
    r = Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="fused")
    assert r.backend.trunk_form == "standard (a graph this module cannot restate)" and not r.backend.head_major_layers
    assert r.ask(question="What is shown?", max_new_tokens=3).token_ids


def test_auto_keeps_the_standard_graph_for_weights_inside_it(exports, tmp_path):
    """Exports before the trunk's weights always went to trunk.onnx.data: built in memory, the fused form of
    such a graph would hold more memory, so "auto" runs the exported graph and "fused" is asked for."""
    import onnx

    d = tmp_path / "inline"
    d.mkdir()
    src = exports["gqa2"]
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("trunk.onnx"):
            (d / f.name).write_bytes(f.read_bytes())
    onnx.save(onnx.load(str(src / "trunk.onnx")), str(d / "trunk.onnx"))
    assert not (d / "trunk.onnx.data").exists()
    backend = OrtBackend(d, torch.float32, "cpu", text=text_config(d))
    assert backend.trunk_form.startswith("standard (the graph holds its weights inline")
    assert OrtBackend(d, torch.float32, "cpu", text=text_config(d), trunk_graph="fused").trunk_form == "fused"


def test_a_token_major_cache_is_refused_clearly(exports):
    from runtime.cache import KVCache

    backend = Reasoner.load(exports["gqa2"], backend="ort").backend
    t = text_config(exports["gqa2"])
    cache = KVCache.allocate(t.num_hidden_layers, 8, t.num_key_value_heads, t.head_dim, torch.float32, "cpu")
    with pytest.raises(ValueError, match="not stored head-major"):
        backend.trunk(torch.zeros(1, 2, t.hidden_size), torch.zeros(3, 1, 2, dtype=torch.long), cache)


def test_mrope_selection_follows_each_family_rule():
    # Qwen2.5-VL: contiguous bands t, h, w; Qwen3-VL: interleaved h/w up to their sections, t elsewhere
    band = ort_graph.mrope_selection(8, [2, 3, 3], False).reshape(3, 8).argmax(0)
    assert band.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    inter = ort_graph.mrope_selection(8, [4, 2, 2], True).reshape(3, 8).argmax(0)
    assert inter.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]


def test_a_head_major_cache_reads_and_compacts_as_a_token_major_one():
    from runtime.cache import KVCache

    token = KVCache.allocate(3, 10, 2, 4, torch.float32, "cpu")
    head = KVCache.allocate(3, 10, 2, 4, torch.float32, "cpu", head_major=2)
    for c in (token, head):
        for i in range(3):
            c.keys[i].copy_(torch.arange(80.0).view(1, 10, 2, 4) + i)
            c.values[i].copy_(-torch.arange(80.0).view(1, 10, 2, 4) - i)
        c.length = 7
    k, v = head.storage(1)  # the buffer as GroupQueryAttention reads it: [1, kv, capacity, hd], one run per head
    assert k.is_contiguous() and k.shape == (1, 2, 10, 4) and torch.equal(k[0, 1, 3], token.keys[1][0, 3, 1])
    assert head.storage(0)[0].data_ptr() == head.keys[0].data_ptr()
    with pytest.raises(ValueError, match="not stored head-major"):
        head.storage(2)
    keep = torch.tensor([0, 2, 5, 6])
    token.keep(keep)
    head.keep(keep)
    for i in range(3):
        assert torch.equal(head.past(i)[0], token.past(i)[0]) and torch.equal(head.past(i)[1], token.past(i)[1])
