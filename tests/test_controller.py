"""V-Reason controller: gradient, direction of a step, what it touches, no-op settings, Lite, backend parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controller import VReason, VReasonConfig, entropy, inject, switching_loss
from models import load_model
from models.samples import render_frames
from runtime.cache import KVCache
from runtime.generate import DecodeState, Loop
from runtime.reasoner import Reasoner
from tests.helpers import visual_prompt

QUESTION = "Which shape moves left?"


@pytest.fixture(scope="module")
def reasoners(engine_dir):
    return {"ort": Reasoner.load(engine_dir, backend="ort"), "torch": Reasoner.load(engine_dir, backend="torch")}


@pytest.fixture(scope="module")
def frames():
    return [f[:, :, ::-1].copy() for f in render_frames("square", "blue", "left", frames=4, size=(96, 128))]


def prefilled(r: Reasoner, frames, steering=None, n_new: int = 8):
    prompt = r.prepare(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=n_new)
    embeds, _ = r._embed(prompt)
    t = r.cfg.text
    cache = KVCache.allocate(t.num_hidden_layers, len(prompt.ids) + n_new, t.num_key_value_heads, t.head_dim,
                             r.dtype, r.device, head_major=r.backend.head_major_layers)
    state = DecodeState(r.head, cache, prompt.video_token_index)
    loop = Loop(r.backend, r.head, steering)
    pos = prompt.positions.unsqueeze(1)
    with torch.no_grad():
        hidden = r.backend.trunk(embeds, pos, cache)
        loop.head_step(state, hidden, pos)
    cache.length += len(prompt.ids)
    state.hidden, state.positions = hidden[:, -1:].clone(), pos[:, :, -1:].clone()
    return prompt, state, loop


def test_gradient_matches_float64_finite_differences(tiny):
    model = load_model(tiny, dtype=torch.float64)
    ids, visuals, _ = visual_prompt(model, tiny, "video")
    pos, _ = model.positions(ids, [s for s, _ in visuals])
    pos = pos.unsqueeze(1)
    video = torch.nonzero(ids == model.cfg.video_token_id).view(-1)
    with torch.no_grad():
        embeds = model.embed_prompt(ids, visuals)
        empty = model.decoder.empty_cache()
        hidden, *_ = model.trunk(embeds[:, :-1], pos[:, :, :-1], *[empty] * (2 * model.trunk.num_layers))
        # the last layer's cache for all but the final token; the final token is the query
        x_all, *_ = model.trunk(embeds, pos, *[empty] * (2 * model.trunk.num_layers))
        _, keys, values = model.head(x_all[:, :-1], pos[:, :, :-1], empty, empty)
    query, qpos = x_all[:, -1:], pos[:, :, -1:]
    original = values[0, video]

    def loss_of(delta, alpha=1.0):
        v = values.index_copy(1, video, inject(original, delta).unsqueeze(0))
        logits, _, _ = model.head(query, qpos, keys, v)
        return switching_loss(logits[0, -1], alpha)

    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(original.shape, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    loss_of(delta).backward()
    eps = 1e-4  # central differences: truncation O(eps^2); smaller eps drowns in log|V| - H cancellation
    flat = delta.detach().view(-1)
    for i in torch.randint(0, flat.numel(), (8,), generator=g).tolist():
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        fd = (loss_of(plus.view_as(delta)) - loss_of(minus.view_as(delta))).item() / (2 * eps)
        assert math.isclose(delta.grad.view(-1)[i].item(), fd, rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_one_step_moves_entropy_in_the_direction_of_alpha(reasoners, frames, alpha):
    r = reasoners["torch"]
    v = VReason(VReasonConfig(lr=1e-2), None)
    _, state, loop = prefilled(r, frames, v)
    v.after_prefill(state)
    with torch.no_grad():
        before = entropy(loop._recompute(state)).item()
    v._update(state, alpha, loop._recompute)
    with torch.no_grad():
        after = entropy(loop._recompute(state)).item()
    assert (after - before) * alpha > 0


@pytest.mark.parametrize("lite", [False, True])
def test_an_update_starts_from_the_tokens_logits_only_where_they_stand_for_the_cache(reasoners, frames, lite):
    """The first token's logits come from the prefill: V-Reason's first update takes them as its LM head's output
    (only the last layer runs again, ``Head.forward(logits=...)``); Lite's were computed before its pruning, so
    its first update takes the ones over the pruned cache."""
    r = reasoners["ort"]
    v = VReason(VReasonConfig(lr=1e-2), None, lite=lite)
    _, state, loop = prefilled(r, frames, v)
    with torch.no_grad():
        logits = loop._recompute(state).clone()
        v.after_prefill(state)
        pruned = loop._recompute(state).clone()
    assert torch.equal(pruned, logits) != lite  # Lite's pruning moved them
    given = []

    def recompute(state, logits=None):
        if logits is not None:
            given.append(logits.clone())
        return loop._recompute(state, logits)

    _, alpha = v.step(state, logits, recompute)
    assert alpha != 0 and len(given) == 1  # the update's forward took the token's logits
    assert torch.equal(given[0], pruned)


def test_update_touches_only_last_layer_video_values_and_keeps_norms(reasoners, frames):
    r = reasoners["ort"]
    v = VReason(VReasonConfig(lr=1e-2), None)
    prompt, state, loop = prefilled(r, frames, v)
    v.after_prefill(state)
    cache = state.cache
    before_k = [k.clone() for k in cache.keys]
    before_v = [x.clone() for x in cache.values]
    v._update(state, 1.0, loop._recompute)
    last = cache.layers - 1
    video = prompt.video_token_index
    assert all(torch.equal(a, b) for a, b in zip(before_k, cache.keys))
    assert all(torch.equal(before_v[i], cache.values[i]) for i in range(last))
    other = torch.ones(cache.capacity, dtype=torch.bool)
    other[video] = False  # text rows, generated rows and unused capacity
    assert torch.equal(before_v[last][0, other], cache.values[last][0, other])
    changed = cache.values[last][0, video]
    assert not torch.equal(before_v[last][0, video], changed)
    assert torch.allclose(changed.norm(dim=-1), before_v[last][0, video].norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("setting", [{"steps": 0}, {"lr": 0.0}])
def test_no_op_settings_equal_the_base_method(reasoners, frames, setting):
    r = reasoners["ort"]
    # both through the PyTorch head the controller steers (on ort, steps without autograd otherwise run the
    # head's ONNX Runtime graph, equal to it to float rounding: tests/test_ort_head.py); what is checked is the
    # controller with the head held fixed
    graph, rows, decode = r.backend.base_head, r.backend.head_rows, r.backend.decode_rows
    r.backend.base_head = r.backend.head_rows = r.backend.decode_rows = None
    try:
        base = r.ask(frames=frames, fps=2.0, question=QUESTION, max_new_tokens=10)
        vr = r.ask(frames=frames, fps=2.0, question=QUESTION, max_new_tokens=10, method="vreason",
                   controller=setting)
    finally:
        r.backend.base_head, r.backend.head_rows, r.backend.decode_rows = graph, rows, decode
    assert vr.token_ids == base.token_ids
    assert vr.entropy == base.entropy  # bit-identical logits give bit-identical entropies
    if "lr" in setting:
        assert any(a != 0 for a in vr.alpha)  # updates did run


def reference_scores(values, video) -> torch.Tensor:
    """Lite's score written out independently, in float64 with explicit loops: for each video token, the L2 norm
    of its value row for every layer and kv head, averaged over both."""
    out = []
    for i in video.tolist():
        norms = [float(torch.linalg.vector_norm(v[0, i, h].double())) for v in values for h in range(v.shape[2])]
        out.append(sum(norms) / len(norms))
    return torch.tensor(out, dtype=torch.float64)


def test_lite_prunes_the_lowest_scored_fraction_from_every_layer(reasoners, frames):
    r = reasoners["ort"]
    v = VReason(VReasonConfig(lite_ratio=0.5), None, lite=True)
    prompt, state, loop = prefilled(r, frames, v)
    cache = state.cache
    video = prompt.video_token_index
    length = cache.length
    snapshot = [x[:, :length].clone() for x in (*cache.keys, *cache.values)]
    scores = reference_scores([x[:, :length] for x in cache.values], video)
    v.after_prefill(state)
    n_drop = int(0.5 * video.numel())
    assert cache.length == length - n_drop
    assert set(v.pruned.tolist()) == set(video[torch.argsort(scores, stable=True)[:n_drop]].tolist())
    keep = torch.tensor([i for i in range(length) if i not in set(v.pruned.tolist())])
    for before, buf in zip(snapshot, (*cache.keys, *cache.values)):
        assert torch.equal(buf[:, : cache.length], before[:, keep])


def test_lite_decoding_equals_reference_on_a_pruned_cache(reasoners, frames, tiny):
    r = reasoners["ort"]
    n = 8
    res = r.ask(frames=frames, fps=2.0, question=QUESTION, max_new_tokens=n, method="vreason-lite",
                controller={"steps": 0})
    # reference: the models' PyTorch trunk and head with torch.cat caches, pruned rows removed, positions kept
    model = load_model(tiny)
    prompt = r.prepare(question=QUESTION, frames=frames, fps=2.0, max_new_tokens=n)
    embeds, _ = r._embed(prompt)
    pos = prompt.positions.unsqueeze(1)
    empty = model.decoder.empty_cache()
    layers = model.trunk.num_layers
    with torch.no_grad():
        hidden, *caches = model.trunk(embeds, pos, *[empty] * (2 * layers))
        _, k, v = model.head(hidden, pos, empty, empty)
        caches += [k, v]
        values = caches[1::2]
        scores = reference_scores(values, prompt.video_token_index)
        n_drop = int(0.5 * prompt.video_token_index.numel())
        dropped = set(prompt.video_token_index[torch.argsort(scores, stable=True)[:n_drop]].tolist())
        keep = torch.tensor([i for i in range(len(prompt.ids)) if i not in dropped])
        # the first token's logits come from the unpruned prefill (as in the runtime), the rest from the pruned cache
        logits, _, _ = model.head(hidden[:, -1:], pos[:, :, -1:], caches[-2][:, :-1], caches[-1][:, :-1])
        caches = [c[:, keep] for c in caches]
        ids, ents = [], []
        for step in range(n):
            tok = int(logits[0, -1].argmax())
            ids.append(tok)
            ents.append(float(entropy(logits[0, -1].double())))
            if tok in r.stop_ids or step + 1 == n:
                break
            p = torch.full((3, 1, 1), prompt.next_position + step, dtype=torch.long)
            x = model.decoder.embed_tokens(torch.tensor([[tok]]))
            x, *new = model.trunk(x, p, *caches[:-2])
            logits, k, v = model.head(x, p, caches[-2], caches[-1])
            new += [k, v]
            caches = [torch.cat((c, nn), dim=1) for c, nn in zip(caches, new)]
    assert res.token_ids == ids
    assert np.allclose(res.entropy, ents, atol=1e-4)  # every step's distribution, not only its argmax


@pytest.mark.parametrize("method", ["vreason", "vreason-lite"])
def test_torch_and_ort_backends_agree_on_vreason(reasoners, frames, method):
    kw = dict(frames=frames, fps=2.0, question=QUESTION, max_new_tokens=12, method=method,
              controller={"lr": 5e-2})
    a = reasoners["ort"].ask(**kw)
    b = reasoners["torch"].ask(**kw)
    assert a.token_ids == b.token_ids
    assert a.alpha == b.alpha and any(x != 0 for x in a.alpha)
    assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) <= 1e-4
    assert max(abs(x - y) for x, y in zip(a.ema, b.ema)) <= 1e-4


def test_non_finite_update_is_skipped_and_counted(reasoners, frames, monkeypatch):
    import controller.vreason as cv

    real = cv.switching_loss
    monkeypatch.setattr(cv, "switching_loss", lambda logits, alpha: real(logits, alpha) * float("nan"))
    res = reasoners["ort"].ask(frames=frames, fps=2.0, question=QUESTION, max_new_tokens=6, method="vreason")
    assert res.skipped_updates >= 1 and len(res.token_ids) >= 1
    assert all(math.isfinite(h) for h in res.entropy)
