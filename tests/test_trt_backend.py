"""The TensorRT backend's own logic, without TensorRT: profile choice, binding plan, set-only-on-change,
every refusal turned into an error naming the tensor. The real engine test runs only with tensorrt + CUDA."""

from __future__ import annotations

import pytest
import torch

from runtime.backends.bindings import (
    rows_bindings,
    scatter_rows,
    scatter_staging,
    select_profile,
    staging_buffers,
    static_trunk_bindings,
    trunk_bindings,
)
from runtime.backends.trt import TrtError, _Engine
from runtime.cache import KVCache


def test_profile_selection():
    assert select_profile(7, 0) == 0  # prefill
    assert select_profile(1, 0) == 0  # one-token prompt
    assert select_profile(1, 9) == 1  # decode
    assert select_profile(3, 9) == 2  # a suffix on a reused prefix, or a later prefill chunk


def test_binding_plan_points_into_the_cache():
    cache = KVCache.allocate(3, 16, 2, 4, torch.float32, "cpu")
    cache.length = 5
    embeds, pos, hidden = torch.zeros(1, 2, 8), torch.zeros(3, 1, 2, dtype=torch.long), torch.zeros(1, 2, 8)
    ins, outs = trunk_bindings(2, embeds, pos, cache, hidden)
    assert list(ins) == ["inputs_embeds", "position_ids", "cache_length", "past_key.0", "past_value.0", "past_key.1",
                         "past_value.1"]
    assert ins["cache_length"].tolist() == [5] and ins["cache_length"].dtype == torch.int64
    assert list(outs) == ["hidden", "key.0", "value.0", "key.1", "value.1"]
    assert ins["past_key.1"].shape == (1, 5, 2, 4) and ins["past_key.1"].data_ptr() == cache.keys[1].data_ptr()
    row = cache.keys[0][0, 0].numel() * cache.keys[0].element_size()
    assert outs["value.1"].shape == (1, 2, 2, 4)
    assert outs["value.1"].data_ptr() == cache.values[1].data_ptr() + 5 * row
    with pytest.raises(RuntimeError, match="overflow"):
        cache.length = 15
        trunk_bindings(2, embeds, pos, cache, hidden)


def test_static_binding_plan_keeps_every_address():
    cache = KVCache.allocate(3, 16, 2, 4, torch.float32, "cpu")
    index = torch.tensor([5])
    embeds, pos, hidden = torch.zeros(1, 1, 8), torch.zeros(3, 1, 1, dtype=torch.long), torch.zeros(1, 1, 8)
    staging = staging_buffers([], 2, cache)
    assert staging_buffers(staging, 2, cache) is staging  # kept while they fit
    plans = []
    for step in range(3):
        index.fill_(5 + step)
        plans.append(static_trunk_bindings(2, embeds, pos, index, cache, hidden, staging))
    ptrs = [{n: t.data_ptr() for n, t in (*i.items(), *o.items())} for i, o in plans]
    assert ptrs[0] == ptrs[1] == ptrs[2]  # same addresses and shapes every step: one TensorRT plan, capturable
    ins, outs = plans[0]
    assert ins["past_key.1"].shape == (1, 16, 2, 4) and ins["cache_length"] is index
    assert outs["key.0"].shape == (1, 1, 2, 4)
    for t in staging:
        t.fill_(3.0)
    scatter_staging(2, cache, index, staging)
    assert bool((cache.values[1][0, 7] == 3).all()) and int((cache.values[1] != 0).sum()) == 8
    assert int((cache.keys[2] != 0).sum()) == 0  # the head's layer is not the trunk's to write
    with pytest.raises(ValueError, match="one token"):
        static_trunk_bindings(2, torch.zeros(1, 2, 8), pos, index, cache, hidden, staging)


def test_rows_binding_plan_passes_the_pools_rows_and_writes_each_row_at_its_length():
    """A batched decode step on the standard graph (ort's standard form, TensorRT's decode profile): the past inputs
    are the pool's token-major buffers (whole, or their first rows), cache_length each row's length, and the new
    entries land in each row at its length."""
    from runtime.pool import KVPool

    pool = KVPool(3, 2, 4, torch.float32, "cpu", head_major=False)
    a, b = pool.acquire(10), pool.acquire(20)
    a.length, b.length = 5, 9
    lengths = torch.tensor(pool.lengths())
    embeds, pos, hidden = torch.zeros(2, 1, 8), torch.zeros(3, 2, 1, dtype=torch.long), torch.zeros(2, 1, 8)
    staging = staging_buffers([], 2, a, rows=2)
    ins, outs = rows_bindings(2, embeds, pos, lengths, pool, hidden, staging)
    assert ins["cache_length"].tolist() == [5, 9] and ins["past_key.1"].data_ptr() == pool.keys[1].data_ptr()
    assert ins["past_key.1"].shape == (2, pool.capacity, 2, 4) and outs["key.0"].shape == (2, 1, 2, 4)
    for i, t in enumerate(staging):
        t[0].fill_(i + 1)
        t[1].fill_(-(i + 1))
    scatter_rows(2, pool, lengths, staging)
    assert bool((a.keys[0][0, 5] == 1).all()) and bool((b.keys[0][0, 9] == -1).all())
    assert bool((a.values[1][0, 5] == 4).all()) and bool((b.values[1][0, 9] == -4).all())
    assert int((pool.keys[0] != 0).sum()) == 2 * 2 * 4  # nothing else written
    assert int((pool.keys[2] != 0).sum()) == 0  # the head's layer is not the trunk's to write
    with pytest.raises(ValueError, match="each of the 2 rows"):
        rows_bindings(2, embeds[:1], pos, lengths, pool, hidden, staging)
    # the first row alone (``KVPool.span`` after the second request left): its slice of the buffers, written alone
    b.release()
    one = staging_buffers([], 2, a, rows=1)
    ins, outs = rows_bindings(2, embeds[:1], pos[:, :1].contiguous(), lengths[:1] + 1, pool, hidden[:1], one,
                              rows=pool.span)
    assert ins["past_value.0"].shape == (1, pool.capacity, 2, 4)
    assert ins["past_value.0"].data_ptr() == pool.values[0].data_ptr()
    for t in one:
        t.fill_(7.0)
    scatter_rows(2, pool, lengths[:1] + 1, one)
    assert bool((a.keys[1][0, 6] == 7).all()) and int((pool.keys[1] == 7).sum()) == 2 * 4  # row 0 only
    with pytest.raises(ValueError, match="token-major"):
        rows_bindings(2, embeds, pos, lengths, KVPool(3, 2, 4, torch.float32, "cpu"), hidden, staging)


class FakeContext:
    """Stands in for IExecutionContext to check our call discipline (no inference happens)."""

    def __init__(self, refuse: str | None = None):
        self.calls, self.refuse = [], refuse

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name))
        return name != self.refuse

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name))
        return name != self.refuse

    def get_tensor_shape(self, name):
        return (1, 2, 8)

    def execute_async_v3(self, stream):
        self.calls.append(("execute", None))
        return True


def fake_engine(refuse=None) -> _Engine:
    e = _Engine.__new__(_Engine)
    e.path = type("P", (), {"name": "trunk.plan"})()
    e.context, e.shapes, e.addresses, e.profile = FakeContext(refuse), {}, {}, 0
    e.dtype_check = lambda name, t: None
    return e


def test_shapes_and_addresses_are_set_only_when_they_change():
    e = fake_engine()
    x, out = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    e.run({"inputs_embeds": x}, {"hidden": out}, 0)
    first = list(e.context.calls)
    e.context.calls.clear()
    e.run({"inputs_embeds": x}, {"hidden": out}, 0)
    assert ("shape", "inputs_embeds") in first and ("address", "hidden") in first
    assert e.context.calls == [("execute", None)]


@pytest.mark.parametrize("refused", ["inputs_embeds", "hidden"])
def test_a_refusal_names_the_tensor(refused):
    e = fake_engine(refuse=refused)
    with pytest.raises(TrtError, match=refused):
        e.run({"inputs_embeds": torch.zeros(1, 2, 8)}, {"hidden": torch.zeros(1, 2, 8)}, 0)


@pytest.mark.tensorrt
def test_trt_backend_matches_ort(tiny, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from export.exporter import export_model
    from runtime.reasoner import Reasoner

    engine = export_model(tiny, tmp_path / "trt", tensorrt=True, quiet=True)
    a = Reasoner.load(engine, backend="trt").ask(question="Which shape moves left?", max_new_tokens=8)
    b = Reasoner.load(engine, backend="ort").ask(question="Which shape moves left?", max_new_tokens=8)
    assert a.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) <= 1e-3
