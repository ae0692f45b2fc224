"""Calibration prompts (the bundled sample videos with a question each) and the quantization error they
measure: the quantized model as it runs (the ONNX trunk graph and the quantized PyTorch head) against the
unquantized PyTorch model, teacher-forced over every prompt position."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLES = (("circle", "red", "right"), ("square", "green", "up"), ("triangle", "blue", "left"),
           ("circle", "yellow", "down"))
QUESTION = "Which way does the {color} {shape} move? Options: left, right, up, down."


@dataclass
class CalibrationPrompt:
    ids: torch.Tensor  # [S]
    positions: torch.Tensor  # [3, S]
    pixel_values: torch.Tensor
    grid: tuple[int, int, int]
    span: object


def calibration_prompts(model_dir: str | Path, cfg, count: int = len(SAMPLES)) -> list[CalibrationPrompt]:
    from models.inputs import build_prompt, visual_from
    from models.preprocess import VisionSettings
    from models.prompt import Tokenizer, load_chat_template, prompt_ids
    from models.samples import sample_video

    tok, template = Tokenizer(Path(model_dir)), load_chat_template(model_dir)
    settings = VisionSettings.from_dir(model_dir)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (shape, color, direction) in enumerate(SAMPLES[:count]):
            video = sample_video(Path(tmp) / f"{i}.mp4", shape, color, direction, seed=i)
            visual = visual_from(cfg, settings, video=video, max_frames=8)
            ids = prompt_ids(tok, template, QUESTION.format(color=color, shape=shape), [visual.prompt_entry(cfg)])
            p = build_prompt(cfg, ids, [visual])
            out.append(CalibrationPrompt(torch.tensor(ids), p.positions, visual.pixel_values, visual.span.grid_thw,
                                         visual.span))
    return out


def quantization_error(model, head, trunk, prompts: list[CalibrationPrompt]) -> dict:
    """Next-token top-1 agreement, mean KL(unquantized || quantized) and max |entropy difference| (nats)
    over every position of the prompts. ``trunk``: the quantized trunk graph's ONNX Runtime session, or a
    callable (embeds [1,S,H], positions [3,1,S], DeepStack features or None) -> hidden [1,S,H] (the torch
    backend's trunk on its device)."""
    dtype, dev = next(model.parameters()).dtype, next(model.parameters()).device
    agree, kls, dh, n, ref_h, vocab = 0, [], 0.0, 0, 0.0, 0
    cfg = model.cfg
    with torch.no_grad():
        for p in prompts:
            visuals = [(p.span, p.pixel_values.to(dev, dtype))]
            pos = p.positions.unsqueeze(1)
            ref = model(p.ids.to(dev), visuals)[0].double().cpu()
            model_embeds, deepstack = model.prompt_inputs(p.ids.to(dev), visuals)
            hd = next(head.parameters()).device
            embeds = head.embed(p.ids.view(1, -1).to(hd)).to("cpu", dtype)  # the text rows as the runtime embeds them
            is_pad = (p.ids == cfg.image_token_id) | (p.ids == cfg.video_token_id)
            embeds[0, is_pad] = model_embeds[0, is_pad.to(dev)].to("cpu", dtype)
            if callable(trunk):
                hidden = trunk(embeds, pos, deepstack)
            else:
                hidden = run_prefill(trunk, embeds, pos, model.trunk.num_layers, cfg.text,
                                     None if deepstack is None else deepstack.cpu())
            empty = torch.zeros(1, 0, cfg.text.num_key_value_heads, cfg.text.head_dim, dtype=dtype, device=hd)
            logits = head(hidden.to(hd, dtype), pos.to(hd), empty, empty)[0][0].double().cpu()
            lr, lq = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
            pr, pq = lr.exp(), lq.exp()
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
            kls.append((pr * (lr - lq)).sum(-1))
            dh = max(dh, float(((-(pr * lr).sum(-1)) - (-(pq * lq).sum(-1))).abs().max()))
            ref_h += float((-(pr * lr).sum(-1)).sum())
            vocab = ref.shape[-1]
            n += ref.shape[0]
    return {"prompts": len(prompts), "positions": n, "top1_agreement": agree / n,
            "mean_kl": float(torch.cat(kls).mean()), "max_abs_entropy_diff": dh,
            "reference_entropy_mean": ref_h / n, "vocab": vocab}


def run_prefill(session, embeds: torch.Tensor, positions: torch.Tensor, num_layers: int, text_cfg,
                deepstack: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [1, S, H] of the trunk graph for a prefill from an empty cache (with the DeepStack features of a
    family that has them)."""
    from export.sessions import with_zero_inputs

    dt = np.float16 if embeds.dtype == torch.float16 else np.float32
    feed = {"inputs_embeds": embeds.float().numpy().astype(dt), "position_ids": positions.numpy(),
            "cache_length": np.zeros(1, np.int64)}
    if deepstack is not None:
        feed["deepstack_embeds"] = deepstack.float().numpy().astype(dt)
    empty = np.zeros((1, 0, text_cfg.num_key_value_heads, text_cfg.head_dim), dt)
    for i in range(num_layers):
        feed[f"past_key.{i}"] = feed[f"past_value.{i}"] = empty
    feed = with_zero_inputs(session, feed, seq=embeds.shape[1], dtype=dt)
    return torch.from_numpy(session.run(["hidden"], feed)[0].astype(np.float32))


def table(err: dict) -> str:
    line = (f"quantization error ({err['prompts']} calibration prompts, {err['positions']} positions, teacher-forced): "
            f"top-1 agreement {err['top1_agreement']:.4f}, mean KL {err['mean_kl']:.3e}, "
            f"max |dH| {err['max_abs_entropy_diff']:.3e} nats")
    h, vocab = err.get("reference_entropy_mean"), err.get("vocab")
    if h is not None and vocab and h > 0.9 * math.log(vocab):
        line += (f"; note: the unquantized model is near-uniform (mean entropy {h:.2f} of at most "
                 f"{math.log(vocab):.2f} nats, as a random model is), so its top-1 is a coin toss and top-1 "
                 "agreement means nothing here: read KL and |dH|")
    return line
