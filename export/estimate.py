"""``python -m export --model DIR --estimate``: the size of an export and the weight bytes each decoded token
reads, for every ``--quantize`` choice, from the config alone (the model is built on the meta device; no
weight is read).

Counted as the exporter writes them: quantized linears as codes (bits / 8 bytes per weight) plus one scale
per block (in the export precision); the head's linears twice (the forward copy and the transposed copy
V-Reason's backward reads); the embedding int8 per row plus a scale per row; everything else (vision encoder,
norms, biases) in the export precision. Per decoded token: every decoder weight once (the forward copies)
and one embedding row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from export.quantize import DEFAULT_BLOCK, Quantization
from models.checkpoint import read_config
from models.errors import UserError
from models.quantized import backward_block

# Jetson Orin modules: memory shared by CPU and GPU (GB), and its bandwidth (GB/s), from NVIDIA's module data
JETSONS = (("Orin Nano 8GB", 8, 68.0), ("Orin NX 16GB", 16, 102.4), ("AGX Orin 32GB", 32, 204.8),
           ("AGX Orin 64GB", 64, 204.8))
RESERVED_GB = 2.0  # left to the OS, CUDA context, runtime and activations when judging whether an export fits
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class Estimate:
    scheme: str
    export_bytes: int
    bytes_per_token: int
    kv_bytes_per_token: int


def read_any_config(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if p.is_file():
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p} is not a JSON config ({e})") from None
    return read_config(p)


def _quantized_bytes(n: int, k: int, bits: int, block: int, scale_bytes: int) -> int:
    return n * k * bits // 8 + n * -(-k // block) * scale_bytes


def estimate(raw_config: dict, precision: str = "fp32", block_size: int = 0) -> list[Estimate]:
    from models.registry import family

    fam = family(raw_config.get("model_type"))
    cfg = fam.Config.from_dict(raw_config)
    t = cfg.text
    with torch.device("meta"):
        model = fam.Model(cfg)
    eb = PRECISION_BYTES[precision]
    last = t.num_hidden_layers - 1
    linear_names = {f"decoder.layers.{i}.{lin}.weight" for i in range(t.num_hidden_layers) for lin in fam.LINEARS}
    head_linear = {f"decoder.layers.{last}.{lin}.weight" for lin in fam.LINEARS} | {"decoder.lm_head.weight"}
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    if t.tie_word_embeddings:
        params.pop("decoder.lm_head.weight", None)  # stored once in a float export
    vision = sum(p.numel() for n, p in params.items() if n.startswith("visual."))
    embed = params["decoder.embed_tokens.weight"]
    other = sum(p.numel() for n, p in params.items()
                if not n.startswith("visual.") and n not in linear_names and n != "decoder.embed_tokens.weight"
                and n != "decoder.lm_head.weight")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False) if n in linear_names
              or n == "decoder.lm_head.weight"}
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * eb
    out = []
    for scheme in ("none", "int8", "int4"):
        if scheme == "none":
            total = sum(p.numel() for p in params.values()) * eb
            per_token = (sum(p.numel() for n, p in params.items() if n.startswith("decoder.")) - embed.numel()
                         + embed.shape[1] + (embed.numel() if t.tie_word_embeddings else 0)) * eb
            out.append(Estimate(scheme, total, per_token, kv))
            continue
        q = Quantization(scheme, block_size).resolve(t, precision if precision != "bf16" else "fp16")
        forward = sum(_quantized_bytes(n, k, q.bits, q.block_size, eb) for n, k in shapes.values())
        backward = sum(_quantized_bytes(k, n, q.bits, backward_block(n, q.block_size), eb)
                       for name, (n, k) in shapes.items() if name in head_linear)
        embedding = embed.numel() + embed.shape[0] * eb
        total = forward + backward + embedding + (vision + other) * eb
        per_token = forward + other * eb + embed.shape[1] * (1 + eb)
        out.append(Estimate(scheme, total, per_token, kv))
    return out


def human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def estimate_table(model: str | Path, precision: str = "fp32", block_size: int = 0, context: int = 8192) -> str:
    rows = estimate(read_any_config(model), precision, block_size)
    gb = 1e9
    head = (f"{'--quantize':<11}{'export size':>13}{'weights/token':>15}  "
            + "  ".join(f"{name} ({bw:g} GB/s)" for name, _, bw in JETSONS))
    lines = [f"{model}: {precision} export, block size {block_size or DEFAULT_BLOCK} (or the largest valid), "
             f"KV cache for {context} tokens; a device fits when export + cache + {RESERVED_GB:g} GB reserved <= "
             "its memory; tokens/s is its bandwidth / weights per token (the decode ceiling)", head]
    for r in rows:
        need = (r.export_bytes + r.kv_bytes_per_token * context) / gb + RESERVED_GB
        cells = [f"{'fits' if need <= mem else 'no':>4}, {bw * gb / r.bytes_per_token:5.0f} tok/s"
                 for _, mem, bw in JETSONS]
        lines.append(f"{r.scheme:<11}{human(r.export_bytes):>13}{human(r.bytes_per_token):>15}  "
                     + "  ".join(f"{c:>{len(n) + len(f'{bw:g}') + 9}}" for c, (n, _, bw) in zip(cells, JETSONS)))
    return "\n".join(lines)
