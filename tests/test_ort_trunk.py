"""The ORT-only form of the trunk graph (``runtime.backends.ort_trunk``): every output equal to the standard
graph's on both families, fp32 and int4, for prefill, a later chunk, decode and the fixed-capacity (static)
form; the ort backend runs it where it costs no memory (or when asked) and falls back where it cannot."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.exporter import export_model
from models.errors import UserError
from models.registry import family
from runtime.backends import ort_trunk
from runtime.backends.ort import OrtBackend, options
from runtime.reasoner import Reasoner


@pytest.fixture(scope="module")
def exports(engine_dir, int4_engine, checkpoints, q3_tiny, tmp_path_factory):
    """fp32 exports of three decoder shapes (GQA 4:2, GQA 4:1 with another M-RoPE split, Qwen3-VL with q/k
    norm, interleaved M-RoPE and DeepStack), and the int4 one."""
    root = tmp_path_factory.mktemp("ort-trunk")
    return {"gqa2": engine_dir, "int4": int4_engine,
            "gqa4": export_model(checkpoints["gqa4"], root / "gqa4", quiet=True),
            "qwen3": export_model(q3_tiny, root / "qwen3", quiet=True)}


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


@pytest.mark.parametrize("name", ["gqa2", "gqa4", "qwen3", "int4"])
def test_fused_graph_equals_the_standard_graph(exports, name):
    d = exports[name]
    providers = ["CPUExecutionProvider"]
    # quantized matmuls in float on both sides (the runtime's int8 activations round apart under any 1e-7
    # difference, see export/sessions.py); the int4 weights are the same
    standard = ort.InferenceSession(str(d / "trunk.onnx"), options(accuracy_level=0), providers=providers)
    fused = ort_trunk.session(d / "trunk.onnx", text_config(d), options(accuracy_level=0), providers)
    ops = [n.op_type for n in __import__("onnx").load_from_string(
        ort_trunk.build(d / "trunk.onnx", text_config(d))).graph.node]
    assert "SkipSimplifiedLayerNormalization" in ops and "RotaryEmbedding" in ops
    for s, p, valid in CASES:
        f = feeds(standard, s, p, valid, seed=s + p)
        want = standard.run(None, f)
        got = fused.run(None, f)
        for o, a, b in zip(standard.get_outputs(), want, got):
            assert a.shape == b.shape, o.name
            assert np.abs(a - b).max() <= 2e-5 * max(1.0, np.abs(a).max()), (name, s, p, o.name)


def test_ort_backend_picks_the_trunk_graph(exports, monkeypatch):

    # the tiny exports keep their weights inside trunk.onnx: "auto" runs the standard graph there (the fused
    # form, built in memory, would cost memory), "fused" asks for it anyway
    r = Reasoner.load(exports["qwen3"], backend="ort")
    assert r.backend.trunk_form.startswith("standard (the graph holds its weights inline")
    r = Reasoner.load(exports["qwen3"], backend="ort", ort_trunk="fused")
    assert r.backend.trunk_form == "fused"
    assert r.ask(question="What is shown?", max_new_tokens=3).token_ids
    assert Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="standard").backend.trunk_form == "standard"
    with pytest.raises(UserError, match="expected auto, fused or standard"):
        Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="fast")

    def refuse(*a, **k):
        raise ort_trunk.Unsupported("a graph this module cannot restate")

    monkeypatch.setattr(ort_trunk, "build", refuse)
    r = Reasoner.load(exports["gqa2"], backend="ort", ort_trunk="fused")
    assert r.backend.trunk_form == "standard (a graph this module cannot restate)"
    assert r.ask(question="What is shown?", max_new_tokens=3).token_ids


def test_auto_fuses_a_trunk_whose_weights_are_external_data(exports, tmp_path):
    import onnx

    d = tmp_path / "external"
    d.mkdir()
    src = exports["gqa2"]
    for f in src.iterdir():
        if f.is_file() and f.name != "trunk.onnx":
            (d / f.name).write_bytes(f.read_bytes())
    model = onnx.load(str(src / "trunk.onnx"))
    onnx.save(model, str(d / "trunk.onnx"), save_as_external_data=True, location="trunk.onnx.data",
               size_threshold=1024)
    backend = OrtBackend(d, torch.float32, "cpu", text=text_config(d))
    assert backend.trunk_form == "fused"
    standard = OrtBackend(d, torch.float32, "cpu", text=text_config(d), trunk_graph="standard")
    f = feeds(standard.trunk_session, 5, 9, 9, seed=1)
    for a, b in zip(standard.trunk_session.run(None, f), backend.trunk_session.run(None, f)):
        assert np.abs(a - b).max() <= 2e-5 * max(1.0, np.abs(a).max())


def test_mrope_selection_follows_each_family_rule():
    # Qwen2.5-VL: contiguous bands t, h, w; Qwen3-VL: interleaved h/w up to their sections, t elsewhere
    band = ort_trunk.mrope_selection(8, [2, 3, 3], False).reshape(3, 8).argmax(0)
    assert band.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    inter = ort_trunk.mrope_selection(8, [4, 2, 2], True).reshape(3, 8).argmax(0)
    assert inter.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
