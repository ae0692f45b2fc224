"""Static decode on CUDA (skipped without a GPU): CUDA-graph replay token-identical to the same steps run
eagerly, for base and V-Reason, in fp32, on both families; bf16 runs finite; buffers and graphs reused across
requests; quantized exports on the GPU path (packed int4/int8 kernels from the export folder alone), their
kernels against the dequantized weights and their quantization error against the CPU path's."""

from __future__ import annotations

import json
import math

import pytest
import torch

from controller import VReasonConfig
from models import load_model
from runtime.bench.synthetic import Runner, synthetic_prompt
from runtime.reasoner import fuse_projections

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STRONG = VReasonConfig(lr=0.5, every=1, steps=2)
BLOCK = 32


@pytest.fixture(params=["gqa2", "gqa4", "qwen3"])
def family_checkpoint(request, checkpoints, q3_tiny):
    return q3_tiny if request.param == "qwen3" else checkpoints[request.param]


def runner(ckpt, dtype, n=24, fuse=True):
    dev = torch.device("cuda")
    model = load_model(ckpt, dtype=dtype, device=dev)
    if fuse:
        fuse_projections(model)
    return Runner(model, model.cfg, dtype, dev, synthetic_prompt(model.cfg, 120, dev), n)


@pytest.mark.parametrize("ctl", [None, STRONG], ids=["default", "strong"])
@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_graph_replay_equals_eager_fp32(family_checkpoint, method, ctl):
    r = runner(family_checkpoint, torch.float32)
    eager = r.run("static", method, graphs=False, controller=ctl)
    graphed = r.run("static", method, graphs=True, controller=ctl)
    replayed = r.run("static", method, graphs=True, controller=ctl)  # second request: no capture, replay only
    assert eager["tokens"] == graphed["tokens"] == replayed["tokens"]
    assert eager["alpha"] == graphed["alpha"] == replayed["alpha"]
    assert replayed["capture_s"] == 0.0 and graphed["capture_s"] > 0


@pytest.mark.parametrize("method", ["base", "vreason"])
def test_static_on_cuda_equals_dynamic_fp32(family_checkpoint, method):
    r = runner(family_checkpoint, torch.float32, fuse=False)
    assert r.run("dynamic", method)["tokens"] == r.run("static", method, graphs=True)["tokens"]


@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_bf16_runs_finite(family_checkpoint, method):
    r = runner(family_checkpoint, torch.bfloat16)
    out = r.run("static", method, graphs=True, controller=STRONG)
    assert len(out["tokens"]) == 24 and out["skipped"] == 0
    assert all(math.isfinite(float(a)) for a in out["alpha"])


def _frames():
    from models.samples import render_frames

    return [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=4, size=(96, 128))]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["base", "vreason-lite"])
def test_reasoner_on_cuda_static_equals_dynamic(engine_dir, q3_engine, family, method):
    from runtime.reasoner import Reasoner

    engine = engine_dir if family == "qwen2_5_vl" else q3_engine
    kw = dict(question="Which shape moves left?", frames=_frames(), fps=2.0, method=method, max_new_tokens=16,
              controller={"lr": 0.5, "every": 1})
    sta = Reasoner.load(engine, backend="torch", device="cuda")  # auto: static, CUDA graphs, fused
    dyn = Reasoner.load(engine, backend="torch", device="cuda", decode="dynamic")
    assert sta.decode == "static" and sta.cuda_graphs
    a, b, c = sta.ask(**kw), sta.ask(**kw), dyn.ask(**kw)
    assert a.token_ids == b.token_ids == c.token_ids and a.alpha == b.alpha == c.alpha


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_requests_together_on_cuda_graphs_equal_each_alone(engine_dir, q3_engine, family):
    """Static decode of several requests together (torch backend, max_batch 4): the batched calls captured as CUDA
    graphs per pool shape and replayed; base, V-Reason and Lite requests together give what each gives alone on
    the same Reasoner, and what dynamic decode gives (fp32: tokens identical, entropies within 1e-5)."""
    from runtime.reasoner import Reasoner
    from tests.test_engine import _solo_then_together

    engine = engine_dir if family == "qwen2_5_vl" else q3_engine
    sta = Reasoner.load(engine, backend="torch", device="cuda", max_batch=4, reuse_mb=0)
    dyn = Reasoner.load(engine, backend="torch", device="cuda", max_batch=4, reuse_mb=0, decode="dynamic")
    assert sta.decode == "static" and sta.pool is not None and sta.backend.fixed.cuda_graphs
    ctl = {"lr": 0.5, "every": 1}
    requests = [dict(question="Which shape moves left?", frames=_frames(), fps=2.0, max_new_tokens=12),
                dict(question="What color is the shape?" * 4, frames=_frames(), fps=2.0, max_new_tokens=10,
                     method="vreason", controller=ctl),
                dict(question="How many shapes?", max_new_tokens=11, method="vreason-lite", frames=_frames(),
                     fps=2.0, controller=ctl),
                dict(question="Which way?", max_new_tokens=9, template="plain")]
    alone, together = _solo_then_together(sta, requests)
    assert sta.backend.fixed.captures >= 2  # the trunk's and the head's calls, captured and replayed
    for a, b, kw in zip(alone, together, requests):
        ref = dyn.ask(**kw)
        for res in (a, b):
            assert res.token_ids == ref.token_ids
            assert max(abs(x - y) for x, y in zip(res.entropy, ref.entropy)) <= 1e-5
    assert max(b.timings["batch_mean"] for b in together) > 1.5


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_reuse_on_the_cuda_graph_path_changes_no_answer(engine_dir, q3_engine, family, method):
    """Prompt-prefix and vision reuse on static decode with CUDA graphs: a second question and the same question
    again give the answers a Reasoner without reuse gives (fp32), and the reuse happened."""
    from runtime.reasoner import Reasoner

    engine = engine_dir if family == "qwen2_5_vl" else q3_engine
    on = Reasoner.load(engine, backend="torch", device="cuda", reuse_mb=64)
    off = Reasoner.load(engine, backend="torch", device="cuda", reuse_mb=0)
    assert on.decode == "static" and on.cuda_graphs
    kw = dict(frames=_frames(), fps=2.0, method=method, max_new_tokens=12, controller={"lr": 0.5, "every": 1})
    first = on.ask(question="Which shape moves left?", **kw)
    second = on.ask(question="What color is the shape?", **kw)
    again = on.ask(question="Which shape moves left?", **kw)
    assert second.timings["reused_prompt_tokens"] > 0 and again.timings["reused_prompt_tokens"] == len(
        first.prompt_token_ids)
    for res, q in ((second, "What color is the shape?"), (again, "Which shape moves left?")):
        ref = off.ask(question=q, **kw)
        assert res.token_ids == ref.token_ids
        assert max(abs(x - y) for x, y in zip(res.entropy, ref.entropy)) <= 1e-5


# -- low-bit weights on the GPU path ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_packed_kernels_on_cuda_compute_the_dequantized_weight(bits):
    from models.quantized import QuantLinear, backward_block, dequantize, rtn_quantize

    g = torch.Generator().manual_seed(bits)
    n, k = 512, 1024
    w = torch.randn(n, k, generator=g) * 0.05
    t = rtn_quantize(w, bits, 128)
    t.update({f"bwd_{key}": v for key, v in rtn_quantize(w.t(), bits, backward_block(n, 128)).items()})
    layer = QuantLinear(k, n, bits, 128, t, backward_block(n, 128))
    deq = layer.dequantized().cuda()
    deq_t = dequantize(layer.bwd_codes, layer.bwd_scales, None, bits, layer.backward_block_size, n).cuda()
    layer.pack("cuda", torch.bfloat16)
    assert layer.codes is None and set(layer.packed) == {"forward", "backward"}
    print(f"int{bits}: {sorted(layer.kernels())}, packed {layer.packed_bytes()} bytes vs bf16 {2 * n * k * 2}")
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = x.detach().float() @ deq.t()
    assert (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    gy = torch.randn(4, n, device="cuda", dtype=torch.bfloat16)
    (y * gy).sum().backward()
    own = gy.float() @ deq_t.t()
    assert (x.grad.float() - own).abs().max() < 2e-2 * own.abs().max()


@pytest.fixture(scope="module")
def quantized_engines(tiny, tmp_path_factory):
    from export.exporter import export_model
    from export.quantize import Quantization

    root = tmp_path_factory.mktemp("gpu-quant")
    return {s: export_model(tiny, root / s, quiet=True, quantization=Quantization(s, BLOCK)) for s in ("int8", "int4")}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_export_on_cuda_holds_packed_weights_and_replays(quantized_engines, scheme):
    from models.quantized import QuantLinear
    from runtime.reasoner import Reasoner

    r = Reasoner.load(quantized_engines[scheme], backend="torch", device="cuda")
    assert r.decode == "static" and r.cuda_graphs
    layers = [m for m in [*r.backend.model.trunk.modules(), *r.head.modules()] if isinstance(m, QuantLinear)]
    assert layers and all(m.packed and m.codes is None for m in layers)  # no dense copy, no stored codes
    print(scheme, r.backend.model.loaded["trunk"])
    kw = dict(question="Which shape moves left?", frames=_frames(), fps=2.0, max_new_tokens=16,
              controller={"lr": 0.5, "every": 1})
    for method in ("base", "vreason", "vreason-lite"):
        a, b = r.ask(method=method, **kw), r.ask(method=method, **kw)  # captured, then replayed
        assert a.token_ids == b.token_ids and a.alpha == b.alpha and len(a.token_ids) > 0
        assert all(math.isfinite(h) for h in a.entropy)
    eager = Reasoner.load(quantized_engines[scheme], backend="torch", device="cuda", cuda_graphs=False)
    assert eager.ask(method="vreason", **kw).token_ids == r.ask(method="vreason", **kw).token_ids


def test_gpu_int4_quantization_error_no_worse_than_cpu(tiny, quantized_engines):
    """The same int4 export, calibration prompts and unquantized reference: the GPU path (packed int4 kernel,
    bf16 activations) against the CPU path (the trunk graph in ONNX Runtime, int8 activations)."""
    from export.calibration import calibration_prompts, quantization_error, table
    from export.sessions import ort_session
    from models.registry import family
    from runtime.backends.torch_ref import model_from_export

    d = quantized_engines["int4"]
    manifest = json.loads((d / "manifest.json").read_text())
    ref = load_model(tiny)
    cfg = ref.cfg
    prompts = calibration_prompts(tiny, cfg)
    load_head = family(cfg.model_type).load_head
    cpu = quantization_error(ref, load_head(cfg, d / "head.safetensors", "fp32", "cpu", manifest["quantization"]),
                             ort_session(d / "trunk.onnx"), prompts)
    gpu_model = model_from_export(d, manifest, torch.float32, "cuda")

    def trunk(embeds, pos, deepstack):
        empty = torch.zeros(1, 0, cfg.text.num_key_value_heads, cfg.text.head_dim, device="cuda")
        past = [empty] * (2 * gpu_model.trunk.num_layers)
        with torch.no_grad():
            return gpu_model.trunk(embeds.cuda(), pos.cuda(), *past)[0].cpu()

    gpu = quantization_error(ref, load_head(cfg, d / "head.safetensors", "fp32", "cuda", manifest["quantization"]),
                             trunk, prompts)
    print("cpu int4:", table(cpu))
    print("gpu int4:", table(gpu))
    assert gpu["top1_agreement"] >= cpu["top1_agreement"] - 0.02
    assert gpu["mean_kl"] <= 1.5 * cpu["mean_kl"] + 1e-4
