"""Weight-only int8/int4 exports: graph vs dequantized-PyTorch parity, the quantization error pinned, the same
greedy tokens on ort and torch, V-Reason on quantized weights, the TensorRT check, sizes, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from controller import VReasonConfig
from export.__main__ import main as export_main
from export.exporter import export_model
from export.manifest import check_export
from export.quantize import Quantization, QuantizationError, quantize_matrix
from export.trt_compat import check_graph
from models.errors import UserError
from models.quantized import QuantLinear, backward_block, dequantize
from runtime.__main__ import main as runtime_main
from runtime.reasoner import Reasoner
from tests.helpers import one_error_line, peer_of_the_same_weights

BLOCK = 32  # the tiny checkpoints' layers are 64 and 128 wide
QUESTION = "Which way does the red circle move?"


@pytest.fixture(scope="module")
def quantized(checkpoints, int4_engine, tmp_path_factory):
    """int8 and int4 exports of both tiny checkpoints (both layouts); the session's int4 one of gqa2."""
    root = tmp_path_factory.mktemp("quantized")
    out = {("gqa2", "int4"): int4_engine}
    for name, scheme in (("gqa2", "int8"), ("gqa4", "int8"), ("gqa4", "int4")):
        out[name, scheme] = export_model(checkpoints[name], root / f"{name}-{scheme}", quiet=True,
                                         quantization=Quantization(scheme, BLOCK))
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from models.samples import sample_video

    return sample_video(tmp_path_factory.mktemp("qvideo") / "clip.mp4", seconds=1.5)


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


KEYS = [("gqa2", "int8"), ("gqa2", "int4"), ("gqa4", "int8"), ("gqa4", "int4")]


@pytest.mark.parametrize("key", KEYS)
def test_graph_matches_pytorch_on_the_same_dequantized_weights(quantized, checkpoints, key):
    from export.quantize import load_trunk_weights, trunk_weights
    from export.validate import validate_export
    from models import load_model
    from models.registry import family

    m = manifest(quantized[key])
    assert m["validation"]["status"] == "passed"
    # recomputed here, not read from the export's own report: PyTorch running the weights the graph holds
    # (dequantized from its initializers) against ONNX Runtime running the graph, on the validation cases
    model = load_model(checkpoints[key[0]])
    specs = {s.name: s for s in family(m["model_type"]).export_spec(model, torch.float32, "cpu")}
    load_trunk_weights(specs["trunk"].module, trunk_weights(quantized[key] / "trunk.onnx"))
    rows = validate_export(model, quantized[key], "fp32", specs["trunk"].input_names,
                           specs["vision"].input_names)["rows"]
    trunk = [r for r in rows if r["graph"] == "trunk"]
    assert len(trunk) >= 4 and all(r["ok"] for r in trunk) and max(r["max_abs_diff"] for r in trunk) < 1e-5
    q = m["quantization"]
    layers = m["config"]["text"]["num_hidden_layers"] - 1
    assert q["trunk"]["quantized_linears"] == 4 * layers and q["block_size"] == BLOCK  # qkv, o, gate_up, down
    graph = onnx.load(str(quantized[key] / "trunk.onnx")).graph
    ops = [n.op_type for n in graph.node]
    if key[1] == "int4":  # standard QDQ: int4 weights, symmetric, blocked, opset 21
        dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 4 * layers and "MatMulNBits" not in ops
        inits = {i.name: i for i in graph.initializer}
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
        assert all(len(n.input) < 3 or not n.input[2] for n in dq)
    else:
        assert ops.count("MatMulNBits") == 4 * layers
    assert not any(n.op_type == "MatMul" and n.input[1] in {i.name for i in graph.initializer} for n in graph.node)
    # ONNX Runtime's profiler at export: packed-weight kernels ran, no weight was dequantized per step
    ran = q["trunk"]["onnxruntime_ran"]
    assert ran["MatMulNBits"] == 4 * layers and ran["DequantizeLinear"] == 0


# pinned on the tiny random checkpoints (not targets): a packing or layout bug drops agreement to chance
PINS = {"int8": (0.93, 0.01, 0.3), "int4": (0.7, 0.3, 2.5)}


@pytest.mark.parametrize("key", KEYS)
def test_quantization_error_is_measured_and_pinned(quantized, key):
    err = manifest(quantized[key])["validation"]["quantization_error"]
    agree, kl, dh = PINS[key[1]]
    assert err["prompts"] == 4 and err["positions"] > 100
    assert err["top1_agreement"] >= agree and 0 < err["mean_kl"] <= kl and err["max_abs_entropy_diff"] <= dh


def test_int8_is_closer_than_int4(quantized):
    e8 = manifest(quantized["gqa2", "int8"])["validation"]["quantization_error"]
    e4 = manifest(quantized["gqa2", "int4"])["validation"]["quantization_error"]
    assert e8["mean_kl"] < e4["mean_kl"] and e8["top1_agreement"] > e4["top1_agreement"]


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantization_and_activation_rounding_equal_onnx_runtime_kernel(bits):
    """Our reading of the MatMulNBits layout against ONNX Runtime's own kernel at float accuracy (level 0),
    and our emulation of its int8 activations against the kernel the runtime uses (level 4)."""
    from models.quantized import _nbits_session, fake_quantize_activations

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 96, generator=g) * 0.05
    t = quantize_matrix(w, Quantization("int8" if bits == 8 else "int4", 32), 32)
    deq = dequantize(t["codes"], t["scales"], t.get("zero_points"), bits, 32, 96)
    exact, _keep = _nbits_session(t["codes"], t["scales"], t.get("zero_points"), bits, 32, 96, 48, 0)
    got = exact.run(None, {"x": np.eye(96, dtype=np.float32)})[0]  # rows of W^T
    assert np.abs(got - deq.t().numpy()).max() < 1e-6
    assert 0 < (deq - w).abs().max() < w.abs().max() / (4 if bits == 4 else 60)
    fast, _keep2 = _nbits_session(t["codes"], t["scales"], t.get("zero_points"), bits, 32, 96, 48, 4)
    x = torch.randn(5, 96, generator=g)
    y = torch.from_numpy(fast.run(None, {"x": x.numpy()})[0])
    assert (y - fake_quantize_activations(x, 32) @ deq.t()).abs().max() < 1e-5
    assert (y - x @ deq.t()).abs().max() > 1e-4  # the emulation is what makes them agree


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_forward_and_backward(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(320, 64, generator=g) * 0.05
    q = Quantization("int8" if bits == 8 else "int4", 32)
    t = quantize_matrix(w, q, 32)
    t.update({f"bwd_{k}": v for k, v in quantize_matrix(w.t(), q, backward_block(320, 32)).items()})
    lin = QuantLinear(64, 320, bits, 32, t, backward_block(320, 32))
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    y = lin(x)
    deq = lin.dequantized()
    assert (y - x @ deq.t()).abs().max() < 0.05 * (x @ deq.t()).abs().max()  # int8 activations in the kernel
    gy = torch.randn(3, 320, generator=g)
    (y * gy).sum().backward()
    exact = gy @ deq
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), exact.flatten(), dim=0)
    assert cos > (0.999 if bits == 8 else 0.98)


def tokens(args: list[str], capsys) -> dict:
    assert runtime_main(args + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("key", [("gqa2", "int8"), ("gqa2", "int4"), ("gqa4", "int8"), ("gqa4", "int4")])
def test_ort_and_torch_backends_give_the_same_greedy_tokens(quantized, key, video, capsys):
    base = ["--engine", str(quantized[key]), "--video", str(video), "--question", QUESTION, "--max-new-tokens", "12"]
    ort = tokens(base + ["--backend", "ort"], capsys)
    ref = tokens(base + ["--backend", "torch"], capsys)
    assert ort["token_ids"] == ref["token_ids"] and len(ort["token_ids"]) > 0
    # the same quantized math; an activation on an int8 rounding boundary may round apart (see validate.py)
    assert np.allclose(ort["entropy"], ref["entropy"], atol=0.05)
    w = ort["config"]["weights"]
    assert w["quantize"] == key[1] and w["block_size"] == BLOCK and w["precision"] == "fp32"


@pytest.mark.parametrize("method", ["vreason", "vreason-lite"])
def test_vreason_runs_on_quantized_weights(quantized, video, method):
    r = Reasoner.load(quantized["gqa2", "int4"], backend="ort")
    strong = VReasonConfig(lr=5.0, steps=2)
    base = r.ask(video=str(video), question=QUESTION, max_new_tokens=16)
    res = r.ask(video=str(video), question=QUESTION, max_new_tokens=16, method=method, controller=strong)
    assert res.skipped_updates == 0 and all(np.isfinite(res.entropy))
    assert any(a != 0 for a in res.alpha)  # updates were taken
    n = min(len(res.entropy), len(base.entropy))  # and they moved the trace, well beyond float noise
    assert res.token_ids != base.token_ids or np.abs(np.subtract(res.entropy[:n], base.entropy[:n])).max() > 0.05
    assert res.config["weights"]["quantize"] == "int4"


def test_check_verifies_a_quantized_export(quantized, capsys):
    d = quantized["gqa2", "int4"]
    assert export_main(["--check", str(d)]) == 0
    assert "ok" in capsys.readouterr().out
    assert check_export(d)["quantization"]["scheme"] == "int4"


def test_tensorrt_check_passes_the_int4_trunk_and_names_unsupported_quantized_nodes(quantized, tmp_path):
    assert check_graph(quantized["gqa2", "int4"] / "trunk.onnx") == []
    findings = [str(f) for f in check_graph(quantized["gqa2", "int8"] / "trunk.onnx")]
    assert findings and all("MatMulNBits" in f and "com.microsoft" in f for f in findings)
    # crafted: an asymmetric (uint4 + zero point) blocked dequantize node in an otherwise valid int4 graph
    model = onnx.load(str(quantized["gqa2", "int4"] / "trunk.onnx"))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    dq.name = "crafted_asymmetric_dq"
    zp = onnx.helper.make_tensor("crafted_zp", onnx.TensorProto.INT4, [2, 64], [1] * 128)
    model.graph.initializer.append(zp)
    dq.input.append("crafted_zp")
    path = tmp_path / "crafted.onnx"
    onnx.save(model, str(path))
    bad = [str(f) for f in check_graph(path)]
    assert any(f.startswith("crafted_asymmetric_dq") and "zero point" in f for f in bad)


def test_int4_export_is_smaller(quantized, engine_dir):
    def weights(d):
        return sum(f.stat().st_size for f in Path(d).iterdir() if f.name in ("trunk.onnx", "head.safetensors"))

    assert weights(quantized["gqa2", "int4"]) < weights(quantized["gqa2", "int8"]) < weights(engine_dir)


def test_estimate_from_the_shipped_configs(capsys):
    from export.estimate import estimate, read_any_config

    root = Path(__file__).resolve().parents[1] / "models" / "configs"
    rows = {r.scheme: r for r in estimate(read_any_config(root / "qwen2.5-vl-7b.json"), "fp16")}
    assert abs(rows["none"].export_bytes - 16.58e9) < 0.05e9  # Qwen2.5-VL-7B in fp16: 8.29 B parameters
    assert rows["int4"].bytes_per_token < rows["int8"].bytes_per_token < rows["none"].bytes_per_token / 1.9
    assert export_main(["--model", str(root / "qwen2.5-vl-3b.json"), "--estimate", "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "int4" in out and "Orin Nano 8GB" in out and "fits" in out


def one_line_error(capsys, argv, want: str, main=export_main) -> None:
    assert want in one_error_line(capsys, main(argv))[0]


def test_bad_quantization_settings_are_one_line_and_leave_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(tiny), "--out", str(out)]
    one_line_error(capsys, base + ["--quantize", "int4", "--block-size", "128"], "does not divide q_proj")
    one_line_error(capsys, base + ["--quantize", "int4", "--block-size", "48"], "power of two")
    one_line_error(capsys, base + ["--quantize", "int4", "--precision", "bf16"], "fp32 or fp16")
    one_line_error(capsys, base + ["--quantize", "int8", "--tensorrt"], "TensorRT cannot build")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantizationError):
        Quantization("int3").resolve(None, "fp32")


def test_backend_that_cannot_run_the_export_and_old_format_versions(quantized, video, tmp_path, capsys):
    args = ["--video", str(video), "--question", QUESTION]
    one_line_error(capsys, ["--engine", str(quantized["gqa2", "int8"]), *args, "--backend", "trt"],
                   "TensorRT cannot run", main=runtime_main)
    import shutil

    old = tmp_path / "old"
    shutil.copytree(quantized["gqa2", "int4"], old)
    m = manifest(old)
    m["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(m))
    one_line_error(capsys, ["--engine", str(old), *args], "format version 2", main=runtime_main)
    with pytest.raises(UserError, match="format version 2"):
        Reasoner.load(old)


def test_bench_measures_exports_side_by_side(engine_dir, quantized, tmp_path, capsys):
    from runtime.bench.__main__ import main as bench_main

    assert bench_main(["--engine", str(engine_dir), str(quantized["gqa2", "int4"]), "--backend", "ort", "--repeats",
                       "1", "--warmup", "0", "--new-tokens", "4", "--seconds", "1", "--work", str(tmp_path),
                       "--no-transformers", "--no-peer", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    fp32, int4 = rep["runs"]["fp32"], rep["runs"]["int4 (fp32 activations)"]
    assert int4["weights"]["quantize"] == "int4" and fp32["weights"]["quantize"] == "none"
    assert int4["weight_bytes_per_token"] < fp32["weight_bytes_per_token"] / 3
    assert int4["export_bytes"] < fp32["export_bytes"]
    assert int4["vreason_update_cost_head_passes"] > 0 and int4["decode_tokens_per_s"]["ort"] > 0


def test_peer_builds_and_runs_the_same_decoder_shape(quantized, tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from runtime.bench.peer import main as peer_main

    engine = quantized["gqa2", "int4"]

    def peer(prompt_tokens) -> int:
        return peer_main(["--engine", str(engine), "--precision", "int4", "--prompt-tokens", str(prompt_tokens),
                          "--new-tokens", "4", "--repeats", "1", "--work", str(tmp_path), "--against", str(engine),
                          "--rounds", "3", "--seconds", "1", "--batch", "2", "--json"])

    # the two sides must prefill as many tokens: a mismatch is one line naming the length to pass
    assert peer(20) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (before it: the peer builder's first-build output)
    assert err.startswith("error: ") and "1 s clip and the peer's is 20" in err
    assert peer(int(err.rsplit(" ", 1)[1])) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["decode_s_per_token"] > 0 and rep["export_bytes"] > 0 and rep["precision"] == "int4"
    assert rep["block_size"] == manifest(engine)["quantization"]["block_size"]  # the compared export's format
    batch = rep["batch"]  # two requests generated together by onnxruntime-genai
    assert batch["size"] == 2 and batch["aggregate_decode_tokens_per_s"] > 0 and batch["aggregate_over_one"] > 0
    sbs = rep["side_by_side"]  # the export on ort and the peer, alternated in one process
    assert sbs["engine"] == str(engine) and sbs["rounds"] == 3 and sbs["trunk"] == "fused"
    assert sbs["ratio_min"] <= sbs["ratio"] <= sbs["ratio_max"] and sbs["decode_tokens_per_s"] > 0


def test_peer_takes_an_int4_exports_weight_format(quantized, engine_dir, tmp_path):
    """The int4 peer is quantized in the compared export's format (``runtime.bench.peer.weight_format``: its block
    size, accuracy level, symmetric blocks), so both read as many bytes per weight; the builder's own default is
    blocks of 32, and a built model's graph says which it got (``block_size``)."""
    pytest.importorskip("onnxruntime_genai")
    from runtime.bench.peer import block_size, build, weight_format

    q = manifest(quantized["gqa2", "int4"])["quantization"]
    assert weight_format(quantized["gqa2", "int4"]) == {
        "block_size": str(q["block_size"]), "accuracy_level": str(q["accuracy_level"]), "is_symmetric": "true"}
    assert weight_format(quantized["gqa2", "int8"]) == weight_format(engine_dir) == weight_format(None) == {}
    text = manifest(engine_dir)["config"]["text"]
    built = {b: build(text, "int4", tmp_path, None, {**weight_format(quantized["gqa2", "int4"]), "block_size": str(b)})
             for b in (16, 64)}
    assert {b: block_size(d) for b, d in built.items()} == {16: 16, 64: 64} and built[16] != built[64]
    assert block_size(build(text, "fp32", tmp_path)) is None


def test_peer_takes_a_float_exports_own_weights(engine_dir, tmp_path):
    """The peer model of a float export is built from that export's weights (``runtime.bench.peer.export_weights``:
    the trunk read back from its graph, fused projections split again, the head from head.safetensors), so it
    decodes the same greedy tokens as the runtime on a text prompt, from logits of the same entropy (Qwen3-VL:
    ``test_qwen3_vl``)."""
    peer_of_the_same_weights(engine_dir, tmp_path)


def test_peer_ratio_is_the_alternated_one_where_measured():
    from runtime.bench.exports import peer_ratios, side_note

    def run(engine, quantize, tps):
        return {"engine": engine, "weights": {"precision": "fp32", "quantize": quantize},
                "decode_tokens_per_s": {"ort": tps}}

    peer = {"ttft_s": 1.0, "prompt_tokens": 10, "peak_memory_bytes": 1, "export_bytes": 1}
    rep = {"runs": {"fp32": run("e32", "none", 10.0), "int4": run("e4", "int4", 50.0)}, "transformers": None,
           "peer": {"fp32": {**peer, "decode_s_per_token": 1 / 20},
                    "int4": {**peer, "decode_s_per_token": 1 / 40,
                             "side_by_side": {"engine": "e4", "ratio": 0.97, "ratio_min": 0.9, "ratio_max": 1.1,
                                              "rounds": 8, "decode_tokens_per_s": 55.0,
                                              "peer_decode_tokens_per_s": 56.0}}}}
    assert peer_ratios(rep) == {("fp32", "ort"): 0.5, ("int4", "ort"): 0.97}
    assert peer_ratios(rep, apart=True) == {("fp32", "ort"): 0.5, ("int4", "ort"): 1.25}
    assert side_note(rep, "int4", "ort").startswith(" (alternated in one process, 8 rounds: x0.90-x1.10, 55.0 against")
    assert side_note(rep, "fp32", "ort") == ""
