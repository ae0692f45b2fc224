"""Qwen3-VL configuration (dense models), read from a checkpoint's config.json in either layout found in the wild.

Two layouts exist, both with ``text_config`` and ``vision_config``:
- the original release (transformers 4.57): ``text_config.rope_scaling`` holds ``mrope_section`` and
  ``mrope_interleaved``, ``rope_theta`` sits beside it;
- transformers 5 ``save_pretrained``: ``text_config.rope_parameters`` holds all three.
The field names the shared Qwen decoder reads (``models.qwen2_5_vl.decoder``) are the same as Qwen2.5-VL's;
what differs is declared here: an explicit ``head_dim``, no attention bias, q/k RMSNorm, interleaved M-RoPE
and the DeepStack layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from models.errors import CheckpointError

VISION_NORM_EPS = 1e-6  # LayerNorm eps of the vision blocks and mergers (fixed in the architecture)


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = True  # RMSNorm over head_dim on q and k before the rotary embedding
    mrope_interleaved: bool = True  # frequency j follows axis (t, h, w)[j % 3] within the sections
    deepstack_layers: int = 0  # decoder layers 0..n-1 get one DeepStack feature each, added to their output

    def __post_init__(self) -> None:
        from models.checks import check_config_numbers

        check_config_numbers(self, "config text")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if sum(self.mrope_section) != self.head_dim // 2:
            raise CheckpointError(
                f"config.json: mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        from models.checks import check_config_numbers

        check_config_numbers(self, "config vision")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square learned position-embedding grid."""
        return int(self.num_position_embeddings**0.5)


@dataclass
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: list[int]
    model_type: str = "qwen3_vl"
    layout: str = "original"  # "original" (rope_scaling) or "transformers" (rope_parameters)

    def __post_init__(self) -> None:
        from models.checks import check_config_numbers

        check_config_numbers(self, "config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> Qwen3VLConfig:
        """Inverse of ``to_dict`` (the form an export's manifest stores)."""
        try:
            rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
            return cls(text=TextConfig(**d["text"]), vision=VisionConfig(**d["vision"]), **rest)
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"the stored config is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen3VLConfig:
        try:
            return _parse(raw)
        except KeyError as e:
            raise CheckpointError(f"config.json is missing the field {e.args[0]!r} that Qwen3-VL needs") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"config.json has a field of the wrong type or value ({e})") from None


def _parse(raw: dict[str, Any]) -> Qwen3VLConfig:
    text = raw["text_config"]
    if not isinstance(text, dict):
        raise KeyError("text_config")
    layout = "transformers" if isinstance(text.get("rope_parameters"), dict) else "original"
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise KeyError("rope_theta")
    if rope.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"config.json: rope_type {rope['rope_type']!r} is not supported (only the default "
                              "M-RoPE the released Qwen3-VL models use)")
    section = rope.get("mrope_section", [24, 20, 20])  # transformers' default when the file has none
    heads = int(text["num_attention_heads"])
    v = raw["vision_config"]
    deepstack = [int(i) for i in v.get("deepstack_visual_indexes", [])]
    t = TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
        rms_norm_eps=float(text["rms_norm_eps"]),
        rope_theta=float(theta),
        mrope_section=[int(s) for s in section],
        hidden_act=str(text.get("hidden_act", "silu")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        attention_bias=bool(text.get("attention_bias", False)),
        mrope_interleaved=True,  # the family's layout (transformers interleaves whatever the flag says)
        deepstack_layers=len(deepstack),
    )
    if t.num_hidden_layers < 2:
        raise CheckpointError("config.json: the decoder needs at least 2 layers (trunk + head split)")
    if t.deepstack_layers > t.num_hidden_layers - 1:
        raise CheckpointError(f"config.json: {t.deepstack_layers} DeepStack layers need at least "
                              f"{t.deepstack_layers + 1} decoder layers (they feed the trunk, not the head)")
    vrope = v.get("rope_parameters") or {}
    vis = VisionConfig(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_heads"]),
        out_hidden_size=int(v["out_hidden_size"]),
        patch_size=int(v["patch_size"]),
        spatial_merge_size=int(v["spatial_merge_size"]),
        temporal_patch_size=int(v["temporal_patch_size"]),
        num_position_embeddings=int(v["num_position_embeddings"]),
        deepstack_visual_indexes=deepstack,
        in_channels=int(v.get("in_channels", 3)),
        hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    if vis.out_hidden_size != t.hidden_size:
        raise CheckpointError(
            f"config.json: vision out_hidden_size {vis.out_hidden_size} != text hidden_size {t.hidden_size}"
        )
    if any(not 0 <= i < vis.depth for i in deepstack):
        raise CheckpointError(f"config.json: deepstack_visual_indexes {deepstack} must lie in 0..{vis.depth - 1}")
    if vis.grid_side**2 != vis.num_position_embeddings:
        raise CheckpointError(f"config.json: num_position_embeddings {vis.num_position_embeddings} is not a square")
    eos = raw.get("eos_token_id", text.get("eos_token_id"))
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return Qwen3VLConfig(
        text=t,
        vision=vis,
        image_token_id=int(raw["image_token_id"]),
        video_token_id=int(raw["video_token_id"]),
        vision_start_token_id=int(raw["vision_start_token_id"]),
        vision_end_token_id=int(raw["vision_end_token_id"]),
        eos_token_ids=eos_ids,
        model_type="qwen3_vl",
        layout=layout,
    )
