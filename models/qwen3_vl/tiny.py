"""Random Qwen3-VL checkpoints (``python -m models.tiny --family qwen3_vl``), in either layout the family has
been saved in: ``transformers`` (transformers 5 ``save_pretrained``: ``rope_parameters``) or ``original`` (the
release's config.json: ``rope_scaling`` with ``mrope_interleaved``, ``rope_theta`` beside it). Both name the
weights ``model.language_model.*``, ``model.visual.*`` and ``lm_head.*``.
"""

from __future__ import annotations

import json
from pathlib import Path

SIZES = {
    # seconds to build; head_dim is explicit and differs from hidden / heads (as in Qwen3-VL-4B), DeepStack
    # takes vision blocks 0 and 2 into decoder layers 0 and 1 of a 3-layer trunk
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 2]),
        vocab=None, tie=False, logit_scale=25.0,
        image_size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
        video_size={"shortest_edge": 64 * 64 * 2, "longest_edge": 96 * 96 * 8},
    ),
    # the Qwen2.5-VL bench decoder's shape (0.5B-sized) with this family's layers: the same-size comparison
    "bench": dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, head_dim=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [12, 10, 10],
                                   "mrope_interleaved": True}),
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, num_position_embeddings=256,
                    deepstack_visual_indexes=[1, 2, 3]),
        vocab=151936, tie=True, logit_scale=1.0,
        image_size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
        video_size={"shortest_edge": 64 * 64 * 2, "longest_edge": 256 * 256 * 8},
    ),
}
MEAN_STD = [0.5, 0.5, 0.5]


def make_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0, layout: str = "transformers",
                    text_overrides: dict | None = None, vision_overrides: dict | None = None,
                    fresh: bool = False) -> Path:
    """Write a random Qwen3-VL checkpoint to ``out`` and return its path (``fresh``: see ``models.tiny``)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from models.tiny import SPECIAL_TOKENS, build_tokenizer, randomize, write_generation_config, write_tokenizer

    spec = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = spec["vocab"] or -(-tok.get_vocab_size() // 64) * 64
    text = dict(spec["text"], vocab_size=vocab, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                max_position_embeddings=32768, tie_word_embeddings=spec["tie"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], **(text_overrides or {}))
    vision = dict(spec["vision"], out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh", **(vision_overrides or {}))
    cfg = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec["tie"],
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    if not fresh:
        randomize(model, seed, spec["tie"], spec["logit_scale"])
    model.save_pretrained(out, safe_serialization=True)
    if layout == "original":
        to_original_layout(out)
    write_tokenizer(out, tok, Path(__file__).parent / "chat_template.jinja")
    pre = {
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3, "image_mean": MEAN_STD, "image_std": MEAN_STD,
        "size": spec["image_size"], "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = dict(pre, video_processor_type="Qwen3VLVideoProcessor", size=spec["video_size"], fps=2.0, min_frames=4,
                 max_frames=768, do_sample_frames=True)
    video.pop("image_processor_type")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    write_generation_config(out, ids)
    return out


def to_original_layout(out: Path) -> None:
    """Rewrite a transformers-5 config as the original release lays it out (``rope_scaling`` and ``rope_theta``
    in ``text_config``)."""
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": rope["mrope_section"], "rope_type": "default"}
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["transformers_version"] = "4.57.0"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
