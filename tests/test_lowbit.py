"""Low-bit weights on the PyTorch path and the export folder as the only source of weights: the export's
rounding reproduced in PyTorch, the packed int4/int8 layouts against the dequantized weights (on CPU through
the kernels' CPU twins; on CUDA in tests/test_gpu.py), the torch backend built from the graphs alone (the
source checkpoint deleted), and the synthetic benchmark's quantized rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from export.exporter import export_model
from export.graph_weights import iter_initializers, read_initializer
from export.quantize import Quantization, quantize_matrix
from models import load_model
from models.errors import UserError
from models.quantized import Int4Packed, Int8Rows, QuantLinear, backward_block, dequantize, rtn_quantize
from models.samples import render_frames
from models.tiny import make_checkpoint
from runtime.backends.torch_ref import model_from_export
from runtime.bench.__main__ import main as bench_main
from runtime.reasoner import Reasoner

BLOCK = 32
FRAMES = [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=4, size=(96, 128))]
ASK = dict(question="Which shape moves left?", frames=FRAMES, fps=2.0, max_new_tokens=10, template="plain")


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_quantize_rounds_as_the_export_quantizer(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 96, generator=g) * 0.05
    ours = rtn_quantize(w, bits, BLOCK)
    theirs = quantize_matrix(w, Quantization("int4" if bits == 4 else "int8", BLOCK), BLOCK)
    assert torch.equal(ours["codes"], theirs["codes"])
    assert torch.equal(ours["scales"], theirs["scales"].view_as(ours["scales"]))


def _layer(bits: int, n: int = 64, k: int = 128, seed: int = 0) -> tuple[QuantLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    t = rtn_quantize(w, bits, BLOCK)
    t.update({f"bwd_{key}": v for key, v in rtn_quantize(w.t(), bits, backward_block(n, BLOCK)).items()})
    layer = QuantLinear(k, n, bits, BLOCK, t, backward_block(n, BLOCK))
    return layer, layer.dequantized()


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layer_computes_the_dequantized_weight(bits):
    """The packed form (the CPU twins of PyTorch's int4 / int8 weight-only kernels: same scale and zero layout
    as on CUDA) forward and backward against x @ W^T and g @ W with W the export's dequantized weight."""
    layer, deq = _layer(bits)
    deq_t = dequantize(layer.bwd_codes, layer.bwd_scales, None, bits, layer.backward_block_size, deq.shape[0])
    dense_bytes = deq.numel() * 2  # the bf16 weight it replaces
    layer.pack("cpu", torch.float32)
    assert layer.codes is None and layer.bwd_codes is None  # one (packed) copy of each weight is left
    assert layer.packed_bytes() < (0.7 if bits == 4 else 1.2) * dense_bytes
    assert isinstance(layer.packed["forward"], Int4Packed if bits == 4 else Int8Rows)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, deq.shape[1], generator=g, requires_grad=True)
    y = layer(x)
    ref = x.detach() @ deq.t()
    # int4: bf16 activations and scales; int8: the per-block codes requantized per row (half a row step at most)
    tol = 1e-2
    assert (y - ref).abs().max() < tol * ref.abs().max()
    if bits == 8:  # exactly what the row codes stand for
        k = layer.packed["forward"]
        rows = x.detach() @ (k.rows.float() * k.scales.float()[:, None]).t()
        assert (y - rows).abs().max() < 1e-5 * rows.abs().max()
    gy = torch.randn(3, deq.shape[0], generator=g)
    (y * gy).sum().backward()
    own = gy @ deq_t.t()  # what the transposed copy stands for (its own rounding of W)
    assert (x.grad - own).abs().max() < tol * own.abs().max()
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), (gy @ deq).flatten(), dim=0)
    assert cos > (0.97 if bits == 4 else 0.999)


def test_compile_options_fuse_only_widened_int8_rows():
    """Coordinate descent tuning (inductor then computes a one-row matmul as a reduction that can take in the int8
    widening) is asked for only where int8 rows are widened per call, as on CUDA; the widened form computes what
    the fused CPU kernel computes; the option is one this PyTorch's inductor knows."""
    from runtime.backends.torch_ref import compile_options

    int8, _ = _layer(8)
    int4, _ = _layer(4)
    model = torch.nn.Sequential(int4.pack("cpu", torch.float32), int8.pack("cpu", torch.float32))
    assert compile_options(model) == {}  # on CPU: PyTorch's fused int8 kernel, nothing to fuse
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4))
    fused = int8(x)
    int8.packed["forward"].fused = False  # the CUDA form
    assert torch.allclose(int8(x), fused, rtol=1e-5, atol=1e-6)
    assert compile_options(model) == {"coordinate_descent_tuning": True}
    assert compile_options(torch.nn.Sequential(int4)) == {}
    assert set(compile_options(model)) <= set(torch._inductor.list_options())


def test_quantized_sessions_read_the_codes_in_place(monkeypatch):
    """A MatMulNBits session is handed the layer's own codes and scales (the model carries placeholders, so ONNX
    Runtime holds only its repacked form); where the placeholders are refused, the serialized form computes the
    same."""
    import pathlib

    import onnxruntime as ort

    from models.quantized import _nbits_session

    layer, deq = _layer(4)
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    real, loaded = ort.InferenceSession, []

    def spy(model, *a, **k):
        loaded.append(type(model))
        return real(model, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    sess, keep = _nbits_session(*layer.nbits_args())
    assert loaded == [str]  # the model file beside its placeholder: no serialized weights
    y = sess.run(None, {"x": x})[0]
    assert np.abs(y - x @ deq.numpy().T).max() < 2e-2 * np.abs(x @ deq.numpy().T).max()
    monkeypatch.setattr(pathlib.Path, "touch", lambda self, *a, **k: None)  # no placeholder file: refused
    sess2, keep2 = _nbits_session(*layer.nbits_args())
    assert loaded == [str, str, bytes]
    assert np.array_equal(sess2.run(None, {"x": x})[0], y)


def test_int4_pack_applies_zero_points():
    """A MatMulNBits weight with stored zero points (not what this exporter writes) still packs exactly."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (16, 64 // BLOCK, BLOCK // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(16, 64 // BLOCK, generator=g) * 0.01
    zp = torch.randint(0, 256, (16, 1), generator=g, dtype=torch.uint8)  # two 4-bit points per byte
    deq = dequantize(codes, scales, zp, 4, BLOCK, 64)
    packed = Int4Packed(codes, scales, zp, BLOCK, 64, 2, "cpu")
    x = torch.randn(2, 64, generator=g)
    assert (packed(x) - x @ deq.t()).abs().max() < 1e-2 * (x @ deq.t()).abs().max()


def test_int4_initializers_read_as_onnx_reads_them(tmp_path):
    from onnx import helper, numpy_helper

    a = np.array([[-8, 7, 0], [3, -1, 5]], dtype=np.int8)
    typed = helper.make_tensor("q", onnx.TensorProto.INT4, a.shape, a.flatten().tolist())
    nibbles = (a.flatten() & 0xF).astype(np.uint8).tolist() + [0]
    packed = bytes(lo | (hi << 4) for lo, hi in zip(nibbles[0::2], nibbles[1::2]))  # low nibble first
    raw = helper.make_tensor("q", onnx.TensorProto.INT4, a.shape, packed, raw=True)
    for init in (typed, raw):
        assert np.array_equal(numpy_helper.to_array(init).astype(np.int8), a)
        assert np.array_equal(read_initializer(init).numpy(), a)


@pytest.fixture(scope="module")
def orphaned(tmp_path_factory):
    """Exports whose source checkpoint no longer exists: fp32 and int4 of Qwen2.5-VL, fp32 of Qwen3-VL; with
    the reference outputs of the checkpoint's own modules, computed before it was deleted."""
    root = tmp_path_factory.mktemp("orphaned")
    out = {}
    for name, family, q in (("q25", "qwen2_5_vl", None), ("q25-int4", "qwen2_5_vl", "int4"),
                            ("q3", "qwen3_vl", None)):
        ckpt = make_checkpoint(root / f"ckpt-{name}", family=family)
        d = export_model(ckpt, root / name, quiet=True,
                         quantization=Quantization(q, BLOCK) if q else None)
        ref = Reasoner.load(d, backend="torch", model_dir=ckpt).ask(**ASK) if q is None else None
        checkpoint_state = load_model(ckpt).state_dict() if q is None else None
        shutil.rmtree(ckpt)
        out[name] = (d, ref, checkpoint_state)
    return out


@pytest.mark.parametrize("name", ["q25", "q25-int4", "q3"])
def test_torch_backend_runs_from_the_export_alone(orphaned, name):
    d, ref, _ = orphaned[name]
    manifest = json.loads((d / "manifest.json").read_text())
    assert not (d.parent / f"ckpt-{name}").exists() and manifest["source_model"].endswith(f"ckpt-{name}")
    torch_r = Reasoner.load(d, backend="torch")
    a, b = torch_r.ask(**ASK), Reasoner.load(d, backend="ort").ask(**ASK)
    assert a.token_ids == b.token_ids and np.allclose(a.entropy, b.entropy, atol=1e-4)
    if ref is not None:  # the checkpoint's own modules gave the same answer before it was deleted
        assert ref.token_ids == a.token_ids and np.allclose(ref.entropy, a.entropy, atol=1e-5)
    loaded = torch_r.backend.model.loaded
    assert loaded["trunk"]["quantized_linears"] == (4 * (manifest["config"]["text"]["num_hidden_layers"] - 1)
                                                    if name.endswith("int4") else 0)


@pytest.mark.parametrize("name", ["q25", "q3"])
def test_export_weights_equal_the_checkpoint(orphaned, name):
    """Every trunk and vision weight read back from the graphs equals the checkpoint's, exactly (fp32)."""
    d, _, state = orphaned[name]
    manifest = json.loads((d / "manifest.json").read_text())
    model = model_from_export(d, manifest, torch.float32, "cpu")
    mine = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    assert any(k.startswith("visual.") for k in mine) and any(".layers.0." in k for k in mine)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for key, value in mine.items():
        parts = next(((key.replace(f, p) for p in ps) for f, ps in fused.items() if f"{f}." in key), None)
        expected = torch.cat([state[p] for p in parts]) if parts else state[key]
        assert torch.equal(value, expected), key


def test_graph_weights_stream_one_tensor_at_a_time(orphaned):
    d, _, _ = orphaned["q25-int4"]
    seen = {name: t.dtype for name, t in iter_initializers(d / "trunk.onnx")}
    assert any(name.endswith("_DQ_Q4") and dt == torch.int8 for name, dt in seen.items())
    assert "trunk.layers.0.input_layernorm.weight" in seen


def test_model_option_is_refused_for_a_quantized_export(orphaned, tiny):
    d, _, _ = orphaned["q25-int4"]
    with pytest.raises(UserError, match="drop --model"):
        Reasoner.load(d, backend="torch", model_dir=tiny)


def test_synthetic_bench_quantized_rows_on_cpu(capsys):
    assert bench_main(["--synthetic", "small", "--device", "cpu", "--prompt-tokens", "64", "--new-tokens", "4",
                       "--repeats", "1", "--warmup", "0", "--quantize", "none", "int8", "int4", "--no-transformers",
                       "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"static", "int8 static", "int4 vreason", "int4 vreason-lite"} <= set(rep["decode_tokens_per_s"])
    b = rep["weight_bytes_per_token"]
    assert b["int4"] < 0.4 * b["none"] and b["int8"] < 0.6 * b["none"]
    m = rep["weights_in_memory_ratio"]
    assert m["none"] == 1.0 and m["int4"] < m["int8"] < 1.0
    assert rep["kernels"]["int4"] == ["int4 aten._weight_int4pack_mm"]
    assert all(r > 0 for r in rep["vreason_token_time_ratio"].values())


def test_kernel_nibbles_are_the_unpacked_codes_repacked_a_slice_at_a_time(monkeypatch):
    """The int4 kernel's input built from the codes by swapping nibbles, a few rows at a time, equals the whole
    matrix unpacked one code per byte and repacked (the even column in the high nibble)."""
    import models.quantized as quantized
    from models.quantized import kernel_nibbles, unpack_codes

    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 256, (40, 128 // BLOCK, BLOCK // 2), generator=g, dtype=torch.uint8)
    u = unpack_codes(codes, 4).to(torch.uint8)  # [N, K], the even column from the low nibble
    whole = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()
    monkeypatch.setattr(quantized, "PACK_ROWS", 16)  # 3 slices, the last one short
    assert torch.equal(kernel_nibbles(codes, 128, "cpu"), whole)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_int4_blocks_the_gpu_kernel_cannot_take_are_refused_at_load(which):
    """Blocks of 16 (the exporter takes them; the GPU kernel does not): one line naming the linear and the limit,
    never a whole float weight rebuilt on every call."""
    from models.errors import CheckpointError

    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) * 0.05
    fwd, bwd = (16, 32) if which == "forward" else (32, 16)
    t = rtn_quantize(w, 4, fwd)
    t.update({f"bwd_{key}": v for key, v in rtn_quantize(w.t(), 4, bwd).items()})
    layer = QuantLinear(128, 64, 4, fwd, t, bwd)
    with pytest.raises(CheckpointError, match=r"lm_head.*blocks of 16 .*--block-size 32"):
        layer.pack("cpu", torch.float32, "lm_head")
    assert backward_block(64, 16) == 16 and backward_block(96, 64) == 32 and backward_block(1024, 256) == 256
