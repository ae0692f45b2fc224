"""Qwen2.5-VL configuration, read from a checkpoint's config.json in either layout found in the wild.

Two layouts exist:
- the original release: text fields at top level, ``rope_scaling`` with ``mrope_section``;
- transformers 5 ``save_pretrained``: ``text_config`` with ``rope_parameters``.
Every field the math depends on comes from the file. The few constants that neither layout stores
(vision RMSNorm eps 1e-6, vision rotary theta 10000) are fixed by the architecture itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from models.errors import CheckpointError

VISION_NORM_EPS = 1e-6  # fixed in the architecture (not stored in any config.json)
VISION_ROPE_THETA = 10000.0


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        from models.checks import check_config_numbers

        check_config_numbers(self, "config text")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads
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
    tokens_per_second: float
    window_size: int
    fullatt_block_indexes: list[int]
    in_channels: int = 3
    hidden_act: str = "silu"

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


@dataclass
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: list[int]
    model_type: str = "qwen2_5_vl"
    layout: str = "original"  # "original" or "transformers" (how the file was written)

    def __post_init__(self) -> None:
        from models.checks import check_config_numbers

        check_config_numbers(self, "config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> Qwen25VLConfig:
        """Inverse of ``to_dict`` (the form an export's manifest stores)."""
        try:
            text = {k: v for k, v in d["text"].items() if k != "head_dim"}
            rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
            return cls(text=TextConfig(**text), vision=VisionConfig(**d["vision"]), **rest)
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"the stored config is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen25VLConfig:
        try:
            return _parse(raw)
        except KeyError as e:
            raise CheckpointError(f"config.json is missing the field {e.args[0]!r} that Qwen2.5-VL needs") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"config.json has a field of the wrong type or value ({e})") from None


def _rope(text: dict[str, Any]) -> tuple[float, list[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise KeyError("rope_theta")
    section = rope.get("mrope_section")
    if section is None:
        raise KeyError("mrope_section")
    return float(theta), [int(s) for s in section]


def _parse(raw: dict[str, Any]) -> Qwen25VLConfig:
    layout = "transformers" if isinstance(raw.get("text_config"), dict) else "original"
    text = dict(raw["text_config"]) if layout == "transformers" else raw
    theta, section = _rope(text)
    tie = bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    t = TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=int(text["num_attention_heads"]),
        num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        rms_norm_eps=float(text["rms_norm_eps"]),
        rope_theta=theta,
        mrope_section=section,
        hidden_act=str(text.get("hidden_act", "silu")),
        tie_word_embeddings=tie,
    )
    if t.num_hidden_layers < 2:
        raise CheckpointError("config.json: the decoder needs at least 2 layers (trunk + head split)")
    v = raw["vision_config"]
    vis = VisionConfig(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_heads"]),
        out_hidden_size=int(v["out_hidden_size"]),
        patch_size=int(v["patch_size"]),
        spatial_merge_size=int(v["spatial_merge_size"]),
        temporal_patch_size=int(v["temporal_patch_size"]),
        tokens_per_second=float(v["tokens_per_second"]),
        window_size=int(v["window_size"]),
        fullatt_block_indexes=[int(i) for i in v["fullatt_block_indexes"]],
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        hidden_act=str(v.get("hidden_act", "silu")),
    )
    if vis.out_hidden_size != t.hidden_size:
        raise CheckpointError(
            f"config.json: vision out_hidden_size {vis.out_hidden_size} != text hidden_size {t.hidden_size}"
        )
    eos = raw.get("eos_token_id", text.get("eos_token_id"))
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return Qwen25VLConfig(
        text=t,
        vision=vis,
        image_token_id=int(raw["image_token_id"]),
        video_token_id=int(raw["video_token_id"]),
        vision_start_token_id=int(raw["vision_start_token_id"]),
        vision_end_token_id=int(raw["vision_end_token_id"]),
        eos_token_ids=eos_ids,
        model_type=str(raw.get("model_type", "qwen2_5_vl")),
        layout=layout,
    )
