"""Random checkpoints of the supported families for tests, demos and benchmarks (nothing is downloaded).

``python -m models.tiny --out DIR [--family qwen2_5_vl|qwen3_vl] [--seed N] [--size tiny|bench]
[--layout transformers|original]`` writes what a real checkpoint carries: config.json, model.safetensors,
tokenizer.json with the chat template and special tokens, preprocessor and generation configs. transformers'
``from_pretrained`` of the family's model class and ``AutoTokenizer`` load it offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# text the tiny tokenizer's merges are learned from: the words its prompts and answers use
CORPUS = [
    "You are a helpful assistant.", "system user assistant",
    "Think the question through step by step before answering: write your reasoning between "
    "<think> and </think>, then give only the final answer between <answer> and </answer>.",
    "Which shape moves left? Which shape moves right? What color is the circle? How many squares?",
    "red green blue yellow white black circle square triangle left right up down first second",
    "A. B. C. D. Options: the answer is 0 1 2 3 4 5 6 7 8 9 10 yes no",
    "Describe the video. What happens in the image? Count the objects.",
]

SIZES = {
    # seconds to build; two distinct shapes are exercised by the tests through overrides
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                          "mrope_section": [2, 3, 3]}),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                    fullatt_block_indexes=[1, 3], tokens_per_second=2),
        vocab=None, tie=False, logit_scale=25.0, min_pixels=56 * 56, max_pixels=112 * 112,
        video_min_pixels=56 * 56, video_max_pixels=112 * 112,
    ),
    # Qwen2.5-0.5B-sized decoder with a small vision tower: the benchmark shape
    "bench": dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                          "mrope_section": [8, 12, 12]}),
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1, 3], tokens_per_second=2),
        vocab=151936, tie=True, logit_scale=1.0, min_pixels=56 * 56, max_pixels=224 * 224,
        video_min_pixels=56 * 56, video_max_pixels=224 * 224,
    ),
}


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


# family -> module whose ``make_checkpoint(out, size, seed, layout, text_overrides, vision_overrides)`` writes one
FAMILIES = {"qwen2_5_vl": "models.tiny", "qwen3_vl": "models.qwen3_vl.tiny"}


def make_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0, layout: str = "transformers",
                    text_overrides: dict | None = None, vision_overrides: dict | None = None,
                    family: str = "qwen2_5_vl", fresh: bool = False) -> Path:
    """Write a random checkpoint of ``family`` to ``out`` and return its path. ``fresh``: the weights as
    ``from_config`` leaves them (biases zeros, norm weights ones: many parameters of equal value), where by
    default every norm and bias is randomized."""
    if family != "qwen2_5_vl":
        import importlib

        return importlib.import_module(FAMILIES[family]).make_checkpoint(out, size, seed, layout, text_overrides,
                                                                          vision_overrides, fresh)
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = spec["vocab"] or -(-tok.get_vocab_size() // 64) * 64
    text = dict(spec["text"], vocab_size=vocab, rms_norm_eps=1e-6, hidden_act="silu",
                max_position_embeddings=32768, tie_word_embeddings=spec["tie"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], **(text_overrides or {}))
    vision = dict(spec["vision"], out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, hidden_act="silu", **(vision_overrides or {}))
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec["tie"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if not fresh:
        randomize(model, seed, spec["tie"], spec["logit_scale"])
    model.save_pretrained(out, safe_serialization=True)
    rename_weights(out, layout)
    if layout == "original":
        to_original_layout(out)
    write_tokenizer(out, tok, Path(__file__).parent / "chat_template.jinja")
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": spec["min_pixels"], "max_pixels": spec["max_pixels"],
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = dict(pre, video_processor_type="Qwen2VLVideoProcessor", min_pixels=spec["video_min_pixels"],
                 max_pixels=spec["video_max_pixels"], fps=2.0, min_frames=4, max_frames=768)
    video.pop("image_processor_type")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    write_generation_config(out, ids)
    return out


def randomize(model, seed: int, tie: bool, logit_scale: float) -> None:
    """Give norms and biases non-trivial values so that the tests exercise them; an untied LM head is scaled up
    (sharper next-token distributions than a 0.02-std head gives: varied entropy)."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight") and tie:
                continue
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim == 1 else 0.02))
        if not tie:
            model.lm_head.weight.mul_(logit_scale)


def write_tokenizer(out: Path, tok, template_path: Path) -> None:
    """tokenizer.json and tokenizer_config.json (transformers' fast tokenizer) with the chat template."""
    from transformers import PreTrainedTokenizerFast

    template = template_path.read_text()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     additional_special_tokens=SPECIAL_TOKENS[1:])
    hf_tok.chat_template = template
    hf_tok.save_pretrained(out)
    if not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)


def write_generation_config(out: Path, ids: dict[str, int]) -> None:
    """generation_config.json: greedy, stopping at <|im_end|> or <|endoftext|>."""
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def to_original_layout(out: Path) -> None:
    """Rewrite a transformers-5 config as the original release lays it out (flat, rope_scaling)."""
    cfg = json.loads((out / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", {})
    flat = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")}
    flat.update(cfg)
    flat["rope_theta"] = rope.get("rope_theta", 1000000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["model_type"] = "qwen2_5_vl"
    flat["vision_config"]["in_chans"] = flat["vision_config"].pop("in_channels", 3)
    (out / "config.json").write_text(json.dumps(flat, indent=2))


def rename_weights(out: Path, layout: str) -> None:
    """Name the weights as the layout does: ``model.*``/``visual.*`` (original) or
    ``model.language_model.*``/``model.visual.*`` (transformers 5)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        if layout == "transformers":
            k = "model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
        renamed[k] = v.contiguous()
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    from models.checks import HelpFormatter, description

    ap = argparse.ArgumentParser(prog="python -m models.tiny", description=description(__doc__),
                                 formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, help="directory to write the checkpoint to")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl", help="model family to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: seconds to build, for tests; bench: a 0.5B-sized decoder of the family, for benchmarks")
    ap.add_argument("--layout", choices=("transformers", "original"), default="transformers",
                    help="config/weight naming: transformers-5 save (default) or the original release's")
    ap.add_argument("--fresh", action="store_true",
                    help="weights as a model fresh from its config has them (biases zeros, norms ones), not "
                         "randomized norms and biases")
    args = ap.parse_args(argv)
    path = make_checkpoint(args.out, args.size, args.seed, args.layout, family=args.family, fresh=args.fresh)
    print(f"wrote {args.size} {args.family} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
