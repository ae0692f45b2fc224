"""Static decode on CUDA (skipped without a GPU): CUDA-graph replay token-identical to the same steps run
eagerly, for base and V-Reason, in fp32; bf16 runs finite; buffers and graphs reused across requests."""

from __future__ import annotations

import math

import pytest
import torch

from controller import VReasonConfig
from models import load_model
from runtime.reasoner import fuse_projections
from runtime.synthetic import Runner, synthetic_prompt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STRONG = VReasonConfig(lr=0.5, every=1, steps=2)


def runner(ckpt, dtype, n=24, fuse=True):
    dev = torch.device("cuda")
    model = load_model(ckpt, dtype=dtype, device=dev)
    if fuse:
        fuse_projections(model)
    return Runner(model, model.cfg, dtype, dev, synthetic_prompt(model.cfg, 120, dev), n)


@pytest.mark.parametrize("ctl", [None, STRONG], ids=["default", "strong"])
@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_graph_replay_equals_eager_fp32(any_checkpoint, method, ctl):
    r = runner(any_checkpoint, torch.float32)
    eager = r.run("static", method, graphs=False, controller=ctl)
    graphed = r.run("static", method, graphs=True, controller=ctl)
    replayed = r.run("static", method, graphs=True, controller=ctl)  # second request: no capture, replay only
    assert eager["tokens"] == graphed["tokens"] == replayed["tokens"]
    assert eager["alpha"] == graphed["alpha"] == replayed["alpha"]
    assert replayed["capture_s"] == 0.0 and graphed["capture_s"] > 0


@pytest.mark.parametrize("method", ["base", "vreason"])
def test_static_on_cuda_equals_dynamic_fp32(any_checkpoint, method):
    r = runner(any_checkpoint, torch.float32, fuse=False)
    assert r.run("dynamic", method)["tokens"] == r.run("static", method, graphs=True)["tokens"]


@pytest.mark.parametrize("method", ["base", "vreason", "vreason-lite"])
def test_bf16_runs_finite(tiny, method):
    r = runner(tiny, torch.bfloat16)
    out = r.run("static", method, graphs=True, controller=STRONG)
    assert len(out["tokens"]) == 24 and out["skipped"] == 0
    assert all(math.isfinite(float(a)) for a in out["alpha"])


@pytest.mark.parametrize("method", ["base", "vreason-lite"])
def test_reasoner_on_cuda_static_equals_dynamic(engine_dir, method):
    from models.samples import render_frames
    from runtime.reasoner import Reasoner

    frames = [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=4, size=(96, 128))]
    kw = dict(question="Which shape moves left?", frames=frames, fps=2.0, method=method, max_new_tokens=16,
              controller={"lr": 0.5, "every": 1})
    sta = Reasoner.load(engine_dir, backend="torch", device="cuda")  # auto: static, CUDA graphs, fused
    dyn = Reasoner.load(engine_dir, backend="torch", device="cuda", decode="dynamic")
    assert sta.decode == "static" and sta.cuda_graphs
    a, b, c = sta.ask(**kw), sta.ask(**kw), dyn.ask(**kw)
    assert a.token_ids == b.token_ids == c.token_ids and a.alpha == b.alpha == c.alpha
