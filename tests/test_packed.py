"""CPU linears through oneDNN over packed weights (``models.packed``) and the torch backend that uses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.packed import PackedLinear, pack_linears, usable
from models.samples import sample_video

pytestmark = pytest.mark.skipif(not usable("cpu", torch.float32),
                                reason="this PyTorch has no oneDNN packed linear (the torch backend keeps F.linear)")


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear_forward_and_input_gradient(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(lin, keep=True)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad = torch.randn(2, 3, 80)
    (packed(xa) * grad).sum().backward()
    assert all(p.grad is None for p in packed.parameters())  # frozen: only the input's gradient
    (lin(xb) * grad).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_packed_linear_rows_are_the_same_numbers_from_two_rows_up():
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(4864, 96), keep=False)  # the K at which one row alone rounds differently
    x = torch.randn(8, 4864)
    with torch.no_grad():
        full = packed(x)
        for n in range(2, 8):
            assert torch.equal(packed(x[:n]), full[:n])
        torch.testing.assert_close(packed(x[:1]), full[:1], rtol=1e-5, atol=1e-5)


def test_a_linear_packed_without_its_weight_refuses_a_backward():
    packed = PackedLinear(nn.Linear(16, 8), keep=False)
    assert packed.weight is None
    x = torch.randn(1, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="kept no weight"):
        packed(x).sum().backward()


def test_pack_linears_replaces_every_linear_in_place():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
        assert pack_linears(model, keep=False) == 3
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_torch_backend_packs_its_linears_and_answers_as_before(engine_dir, monkeypatch, tmp_path):
    """The torch backend on CPU packs the trunk's and the head's linears; greedy answers (base and V-Reason, whose
    update backpropagates through the packed last layer) equal those of the same export with PyTorch's own
    linears, entropies to float rounding."""
    import models.packed
    from runtime.reasoner import Reasoner

    video = str(sample_video(tmp_path / "clip.mp4", seconds=1.0, fps=4.0, size=(56, 56)))
    packed = Reasoner.load(engine_dir, backend="torch", max_batch=1)
    assert packed.backend.packed_linears > 0
    assert "oneDNN" in packed.backend_reason  # what `python -m runtime` prints after "backend: torch"
    assert not any(isinstance(m, nn.Linear) for m in packed.backend.model.trunk.modules())
    monkeypatch.setattr(models.packed, "usable", lambda *a: False)
    plain = Reasoner.load(engine_dir, backend="torch", max_batch=1)
    assert plain.backend.packed_linears == 0
    for method in ("base", "vreason"):
        a, b = (r.ask(video=video, question="Which way does it move?", method=method, max_new_tokens=8)
                for r in (packed, plain))
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) < 1e-4
        assert a.alpha == pytest.approx(b.alpha, abs=1e-4)


def test_the_load_time_check_leaves_the_random_stream_alone():
    state = torch.random.get_rng_state()
    assert usable("cpu", torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not usable("cpu", torch.float16) and not usable("meta", torch.float32)
