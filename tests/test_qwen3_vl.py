"""The Qwen3-VL family end to end, against transformers' own Qwen3VLForConditionalGeneration and processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from models import CheckpointError, family_for, load_model
from models.inputs import build_prompt, visual_from
from models.preprocess import VisionSettings, patch_timestamps, process_image, process_video, sample_indices
from models.prompt import Tokenizer, load_chat_template, prompt_ids
from models.samples import sample_video
from models.tiny import make_checkpoint
from runtime.reasoner import Reasoner

QUESTION = "Which way does the red circle move?"


@pytest.fixture(scope="module")
def q3(q3_tiny, tmp_path_factory) -> dict:
    """Tiny Qwen3-VL checkpoints in both layouts the family has been saved in (the transformers one is the
    session's, which ``q3_engine`` exports)."""
    original = make_checkpoint(tmp_path_factory.mktemp("qwen3_vl") / "original", family="qwen3_vl",
                               layout="original", seed=1)
    return {"transformers": q3_tiny, "original": original}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return sample_video(tmp_path_factory.mktemp("clip") / "clip.mp4", "circle", "red", "right", seed=0, seconds=3)


@pytest.fixture(scope="module")
def q3_reasoners(q3_engine):
    return {b: Reasoner.load(q3_engine, backend=b) for b in ("ort", "torch")}


def prompt_for(ckpt, cfg, kind: str, clip):
    """(input_ids [S], [(span, pixel_values)], transformers kwargs) built the way the runtime builds them."""
    s = VisionSettings.from_dir(ckpt)
    rng = np.random.default_rng(0)
    visual = None
    if kind == "image":
        visual = visual_from(cfg, s, image=rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    elif kind == "video":
        visual = visual_from(cfg, s, video=clip, max_frames=8)
    visuals = [visual] if visual else []
    ids = prompt_ids(Tokenizer(ckpt), load_chat_template(ckpt), QUESTION, [v.prompt_entry(cfg) for v in visuals])
    return build_prompt(cfg, ids, visuals)


def hf_kwargs(cfg, prompt) -> dict:
    ids = torch.tensor([prompt.ids])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for v in prompt.visuals:
        grid = torch.tensor([v.span.grid_thw])
        if v.span.kind == "video":
            kw |= {"pixel_values_videos": v.pixel_values, "video_grid_thw": grid,
                   "mm_token_type_ids": 2 * (ids == cfg.video_token_id).int()}
        else:
            kw |= {"pixel_values": v.pixel_values, "image_grid_thw": grid,
                   "mm_token_type_ids": (ids == cfg.image_token_id).int()}
    return kw


@pytest.mark.parametrize("layout", ["transformers", "original"])
@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_full_sequence_logits_match_transformers(q3, clip, layout, kind):
    ckpt = q3[layout]
    ours = load_model(ckpt)
    assert ours.cfg.layout == layout and ours.cfg.text.deepstack_layers == 2
    ref = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    prompt = prompt_for(ckpt, ours.cfg, kind, clip)
    ids = torch.tensor(prompt.ids)
    visuals = [(v.span, v.pixel_values) for v in prompt.visuals]
    with torch.no_grad():
        got = ours(ids, visuals)
        # no positions passed: transformers computes its own M-RoPE ids from the token types and grids
        want = ref(**hf_kwargs(ours.cfg, prompt)).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    if kind != "text":  # DeepStack is part of what matched: without its features the logits move
        embeds, deepstack = ours.prompt_inputs(ids, visuals)
        assert deepstack is not None and deepstack.abs().max() > 0
        with torch.no_grad():
            hidden, *_ = ours.trunk(embeds, prompt.positions[:, None], *[ours.decoder.empty_cache()] * 6)
            plain, _, _ = ours.head(hidden, prompt.positions[:, None], ours.decoder.empty_cache(),
                                    ours.decoder.empty_cache())
        assert (plain - want).abs().max().item() > 1e-3


def test_video_prompt_carries_a_timestamp_per_temporal_patch(q3, clip):
    ckpt = q3["transformers"]
    cfg = load_model(ckpt).cfg
    prompt = prompt_for(ckpt, cfg, "video", clip)
    v = prompt.visuals[0]
    t, h, w = v.span.grid_thw
    text = Tokenizer(ckpt).decode(prompt.ids, skip_special_tokens=False)
    per_frame = h * w // 4
    for stamp in v.timestamps:
        assert f"<{stamp:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>" in text
    assert len(v.timestamps) == t and text.count("<|vision_start|>") == t  # the template's own pair replaced
    # the timestamps of transformers' processor for the same sampled frames
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    s = VisionSettings.from_dir(ckpt)
    idx = sample_indices(24, 8.0, s, 8)  # the sample clip: 3 s at 8 fps
    want = Qwen3VLProcessor._calculate_timestamps(None, idx.tolist(), 8.0, 2)
    assert patch_timestamps([i / 8.0 for i in idx], 2) == pytest.approx(want)
    assert v.timestamps == pytest.approx(want)


def test_pixel_values_and_frame_sampling_match_transformers(q3):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
    from transformers.video_utils import VideoMetadata

    ckpt = q3["transformers"]
    s = VisionSettings.from_dir(ckpt)
    assert s.video_rule == "qwen3_vl" and s.patch_size == 16 and s.image_mean == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    pv, grid = process_image(img, s)
    ref = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=[img], return_tensors="np")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert np.abs(pv - ref["pixel_values"]).max() <= 1e-5
    # videos: the family's frame-size rule, then frame by frame as the image processor does at that size
    frames = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(5)]
    pv, (t, gh, gw) = process_video(frames, s)
    h, w = smart_resize(5, 90, 120, 2, 32, s.video_min_pixels, s.video_max_pixels)
    assert (t, gh, gw) == (3, h // 16, w // 16)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": h * w, "longest_edge": h * w}, patch_size=16,
                                    temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    per_frame = [proc(images=[f], return_tensors="np")["pixel_values"].reshape(gh * gw, 3, 2, 16, 16)[:, :, 0]
                 for f in frames + [frames[-1]]]
    want = np.concatenate([np.stack([per_frame[2 * i], per_frame[2 * i + 1]], axis=2) for i in range(t)])
    assert np.abs(pv - want.reshape(pv.shape)).max() <= 1e-5
    vp = Qwen3VLVideoProcessor.from_pretrained(ckpt)
    for total, fps in ((91, 30.0), (10, 30.0), (3000, 25.0), (2, 30.0)):
        want = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=fps))
        assert sample_indices(total, fps, s).tolist() == list(want)


def test_trunk_and_head_incremental_equal_full_forward(q3, clip):
    ckpt = q3["original"]
    model = load_model(ckpt)
    prompt = prompt_for(ckpt, model.cfg, "video", clip)
    ids, pos = torch.tensor(prompt.ids), prompt.positions
    visuals = [(v.span, v.pixel_values) for v in prompt.visuals]
    with torch.no_grad():
        full = model(ids, visuals)[0]
        embeds, deepstack = model.prompt_inputs(ids, visuals)
        n_prefill = len(ids) - 4
        caches = [model.decoder.empty_cache() for _ in range(2 * len(model.decoder.layers))]
        got = []
        for start, stop in [(0, n_prefill)] + [(i, i + 1) for i in range(n_prefill, len(ids))]:
            p = pos[:, None, start:stop]
            hidden, *new = model.trunk(embeds[:, start:stop], p, *caches[:-2], deepstack=deepstack[:, :, start:stop])
            logits, k, v = model.head(hidden, p, caches[-2], caches[-1])
            caches = [torch.cat((c, n), dim=1) for c, n in zip(caches, [*new, k, v])]
            got.append(logits[0])
    assert (torch.cat(got) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_greedy_tokens_identical_to_transformers_generate_for_a_video(q3, q3_engine, q3_reasoners, clip, backend,
                                                                      capsys):
    import json

    from runtime.__main__ import main as runtime_main

    n = 12
    assert runtime_main(["--engine", str(q3_engine), "--backend", backend, "--video", str(clip), "--question",
                         QUESTION, "--max-new-tokens", str(n), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = q3_reasoners[backend]
    prompt = r.prepare(question=QUESTION, video=clip, max_new_tokens=n)
    assert out["prompt_token_ids"] == prompt.ids
    ref = Qwen3VLForConditionalGeneration.from_pretrained(q3["transformers"]).eval()
    with torch.no_grad():
        gen = ref.generate(**hf_kwargs(r.cfg, prompt), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = gen.sequences[0, len(prompt.ids):].tolist()
    got = out["token_ids"]
    assert got == want[: len(got)]
    assert len(got) == n or got[-1] in r.stop_ids  # the whole answer, or up to a stop token
    # every step's whole distribution, not only its argmax: entropies of transformers' logits
    logp = torch.log_softmax(torch.cat(gen.logits[: len(got)]).double(), -1)
    assert np.allclose(out["entropy"], (-(logp.exp() * logp).sum(-1)).tolist(), atol=1e-3)


def test_vreason_and_lite_run_and_a_strong_controller_moves_the_trace(q3_reasoners, clip):
    r = q3_reasoners["ort"]
    base = r.ask(question=QUESTION, video=clip, max_new_tokens=10, method="base")
    strong = {"lr": 0.5, "every": 1, "steps": 2}
    v = r.ask(question=QUESTION, video=clip, max_new_tokens=10, method="vreason", controller=strong)
    lite = r.ask(question=QUESTION, video=clip, max_new_tokens=10, method="vreason-lite", controller=strong)
    assert all(np.isfinite(x.entropy).all() for x in (base, v, lite))
    assert v.skipped_updates == 0 and any(a != 0 for a in v.alpha)
    n = min(len(base.entropy), len(v.entropy))
    assert max(abs(a - b) for a, b in zip(base.entropy[1:n], v.entropy[1:n])) > 1e-3
    assert lite.config["lite"] is True and len(lite.token_ids) >= 1


def test_lite_prunes_the_same_tokens_from_every_layer(q3_reasoners, clip):
    """DeepStack only touches the prefill: after Lite's pruning every layer's cache holds exactly the unpruned
    prefill's rows at the kept positions, and the DeepStack features are released."""
    from controller import VReason, VReasonConfig
    from runtime.cache import KVCache
    from runtime.generate import DecodeState, Loop

    r = q3_reasoners["torch"]
    prompt = r.prepare(question=QUESTION, video=clip, max_new_tokens=4)
    embeds, deepstack, _, _ = r._prefill_inputs(prompt)
    assert deepstack is not None and deepstack.shape[0] == r.cfg.text.deepstack_layers
    t = r.cfg.text

    def prefilled(lite: bool):
        cache = KVCache.allocate(t.num_hidden_layers, len(prompt.ids) + 4, t.num_key_value_heads, t.head_dim,
                                 r.dtype, r.device)
        state = DecodeState(r.head, cache, prompt.video_token_index, deepstack=deepstack)
        steer = VReason(VReasonConfig(lite_ratio=0.5), state, lite=True) if lite else None
        Loop(r.backend, r.head, steer).prefill(state, embeds, prompt.positions.unsqueeze(1))
        assert state.deepstack is None
        return cache, steer

    full, _ = prefilled(False)
    lite, steer = prefilled(True)
    n_video = prompt.video_token_index.numel()
    assert lite.length == len(prompt.ids) - n_video // 2 == len(prompt.ids) - steer.pruned.numel()
    keep = torch.tensor(sorted(set(range(len(prompt.ids))) - set(steer.pruned.tolist())))
    for layer in range(t.num_hidden_layers):  # the trunk's layers and the head's
        assert torch.equal(lite.keys[layer][:, : lite.length], full.keys[layer][:, keep])
        assert torch.equal(lite.values[layer][:, : lite.length], full.values[layer][:, keep])


def test_registry_refuses_the_moe_variant_in_one_line(q3, tmp_path):
    import json
    import shutil

    d = tmp_path / "moe"
    shutil.copytree(q3["transformers"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen3_vl_moe"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="qwen3_vl_moe.*not supported yet.*qwen2_5_vl, qwen3_vl") as e:
        family_for(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"])
def test_shipped_configs_estimate(name):
    from export.estimate import estimate, read_any_config
    from runtime.bench.synthetic import CONFIGS

    rows = {r.scheme: r for r in estimate(read_any_config(CONFIGS / f"{name}.json"), "fp16")}
    billions = rows["none"].export_bytes / 2 / 1e9
    assert {"2b": 1.5 < billions < 2.6, "4b": 3.8 < billions < 5.0, "8b": 8.0 < billions < 9.2}[name[-2:]]
    assert rows["int4"].bytes_per_token < rows["int8"].bytes_per_token < rows["none"].bytes_per_token


def test_synthetic_bench_runs_the_family(capsys):
    import json

    from runtime.bench.__main__ import main as bench_main

    assert bench_main(["--synthetic", "qwen3-vl-small", "--device", "cpu", "--prompt-tokens", "64", "--new-tokens",
                       "6", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["decode_tokens_per_s"]) == {"dynamic", "static", "vreason", "vreason-lite", "transformers"}
    assert rep["tokens_identical_to_dynamic"] == {"static": True} and rep["video_tokens"] > 0


def test_static_decode_equals_dynamic_on_the_family(q3_engine, q3_reasoners, clip):
    """Static decode binds zeros for the DeepStack input at every step; same tokens and entropies as dynamic."""
    static = Reasoner.load(q3_engine, backend="ort", decode="static")
    a = q3_reasoners["ort"].ask(question=QUESTION, video=clip, max_new_tokens=8, method="vreason")
    b = static.ask(question=QUESTION, video=clip, max_new_tokens=8, method="vreason")
    assert a.token_ids == b.token_ids and np.allclose(a.entropy, b.entropy, atol=1e-5)


def test_tensorrt_profiles_name_every_graph_input(q3_engine):
    """The TensorRT build (unverified here: no TensorRT) gets a shape for each input of the family's graphs,
    DeepStack's included, within the export's limits."""
    import json

    from export.exporter import Limits, trt_profiles
    from models.registry import family

    m = json.loads((q3_engine / "manifest.json").read_text())
    cfg = family(m["model_type"]).Config.from_stored(m["config"])
    lim = Limits(**m["limits"])
    for graph, profiles in trt_profiles(cfg, lim).items():
        inputs = [i["name"] for i in m["graphs"][graph]["inputs"]]
        for p in profiles:
            assert sorted(p.shapes) == sorted(inputs)
    prefill, decode, suffix = trt_profiles(cfg, lim)["trunk"]
    k, h = cfg.text.deepstack_layers, cfg.text.hidden_size
    assert prefill.shapes["deepstack_embeds"][2] == (k, 1, lim.max_prompt, h)
    assert decode.shapes["deepstack_embeds"] == ((k, 1, 1, h), (k, 4, 1, h), (k, 8, 1, h))  # rows decoded together
    assert suffix.shapes["deepstack_embeds"][0] == (k, 1, 2, h)
    vision = trt_profiles(cfg, lim)["vision"][0].shapes
    assert vision["pos_weight"][2] == (lim.max_frame_patches, 4)


def test_derived_vision_limits_hold_every_video_the_rules_allow(q3):
    """The export's patch limits (TensorRT profiles, the runtime's up-front check) bound every video the
    family's frame rule can produce."""
    from export.exporter import Limits, derive_limits
    from models.preprocess import video_frame_size

    s = VisionSettings.from_dir(q3["transformers"])
    lim = derive_limits(Limits(), s, s.patch_size, s.merge_size)
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, h, w = int(rng.integers(1, 40)), int(rng.integers(20, 1000)), int(rng.integers(20, 1000))
        if max(h, w) / min(h, w) > 200:
            continue
        fh, fw = video_frame_size(h, w, n, s)
        frame = (fh // s.patch_size) * (fw // s.patch_size)
        assert frame <= lim.max_frame_patches and -(-n // 2) * frame <= lim.max_vision_patches, (n, h, w)


def test_peer_takes_the_exports_own_weights(q3_engine, tmp_path):
    """onnxruntime-genai's Qwen3 model built from the export's weights (q/k norms included) decodes our greedy tokens
    from logits of the same entropy (``tests.helpers.peer_of_the_same_weights``)."""
    from tests.helpers import peer_of_the_same_weights

    peer_of_the_same_weights(q3_engine, tmp_path)
