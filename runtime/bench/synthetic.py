"""python -m runtime.bench --synthetic NAME: decode speed at a real model's shape with random weights.

No checkpoint files: the decoder of a shipped configuration (``models/configs/NAME.json``: the published
Qwen2.5-VL-7B and -3B and Qwen3-VL-2B, -4B and -8B configs, or ``small`` / ``qwen3-vl-small`` for CPU runs) is
built with random weights directly in device memory, and a prompt of ``--prompt-tokens`` tokens (about 85% of
them one video's tokens, with their family's M-RoPE positions; their embeddings random, no vision encoder, so
no DeepStack features) is decoded for ``--new-tokens`` tokens, greedy.
Measured side by side in one run: the dynamic loop (the cache grows per token, eager), the static loop
(fixed shapes; on CUDA each step replayed as a CUDA graph), optionally the static loop with torch.compile,
V-Reason and V-Reason Lite on the static loop, and transformers' eager ``generate`` on a random model of the
same shape. With ``--quantize none int8 int4`` each scheme gets its own decoder (the unquantized one rounded as
the export rounds, ``models.quantized.rtn_quantize``, and held packed as a quantized export is on that device)
and its own rows: static, V-Reason and Lite, bytes read per step, weights held in memory. Speed only: random
weights say nothing about answers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import models
from models.errors import UserError

CONFIGS = Path(models.__file__).resolve().parent / "configs"  # the shipped configs, beside the families


# model_type -> transformers' (config class, model class): the reference generate of the same shape
TRANSFORMERS_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}


def synthetic_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_config(name: str):
    from models.registry import family

    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise UserError(f"unknown synthetic model {name!r}; choose one of {', '.join(synthetic_names())}")
    raw = json.loads(path.read_text())
    return family(raw["model_type"]).Config.from_dict(raw), raw


def random_decoder(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The decoder with random weights made in place on ``device`` (std 0.02 linears, unit norms)."""
    from models.qwen2_5_vl.decoder import Decoder, Head, MRoPE, Trunk

    with torch.device("meta"):
        dec = Decoder(cfg.text)
    dec = dec.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    dec.rotary.inv_freq = MRoPE(cfg.text).inv_freq.to(device)
    if cfg.text.tie_word_embeddings:
        dec.lm_head.weight = dec.embed_tokens.weight
    dec.eval().requires_grad_(False)
    return SimpleNamespace(decoder=dec, trunk=Trunk(dec), head=Head(dec))


def synthetic_prompt(cfg, prompt_tokens: int, device: torch.device, seed: int = 0):
    """(ids [S], positions [3,1,S], video cache indices, next rotary position): text, one video, text."""
    from models.qwen2_5_vl.positions import VisualSpan
    from models.registry import family

    fam = family(cfg.model_type)
    m = cfg.vision.spatial_merge_size
    side = max(1, int((0.85 * prompt_tokens / 4) ** 0.5))  # 4 temporal patches of side x side merged tokens
    grid = (4, side * m, side * m)
    n_video = 4 * side * side
    before = 16
    after = max(1, prompt_tokens - n_video - before - 2)
    g = torch.Generator().manual_seed(seed)
    special = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    text = torch.randint(0, min(cfg.text.vocab_size, 150000, *special), (before + after,), generator=g).tolist()
    start, pad, end = [cfg.vision_start_token_id], [cfg.video_token_id], [cfg.vision_end_token_id]
    if fam.VIDEO_TIMESTAMPS:  # one run per temporal patch, after a few timestamp-like text tokens
        stamp = text[:3]
        video = [t for _ in range(4) for t in stamp + start + pad * (n_video // 4) + end]
        text = text[: max(1, len(text) - 4 * (len(stamp) + 1))]
        before = min(before, len(text) - 1)
    else:
        video = start + pad * n_video + end
    ids = text[:before] + video + text[before:]
    ids_t = torch.tensor(ids)
    pos, next_pos = fam.prompt_positions(cfg, ids_t, [VisualSpan("video", grid, 1.0)])
    video = torch.nonzero(ids_t == cfg.video_token_id).view(-1)
    return ids_t.to(device), pos.unsqueeze(1).to(device), video.to(device), int(next_pos)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 31, repeats: int = 10) -> float:
    """Bytes/s moved by a device-to-device copy (bytes read + bytes written), median of ``repeats``."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def decode_bytes(model) -> int:
    """Weights a decode step reads: every decoder layer, the final norm and the LM head (not the embedding);
    a quantized linear's packed forward weights and bias (not its transposed copy)."""
    from models.quantized import QuantLinear

    d = model.decoder
    total = 0
    for sub in (m for part in (d.layers, d.norm, d.lm_head) for m in part.modules()):
        if isinstance(sub, QuantLinear):
            total += sub.forward_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False))
    return total


def weights_in_memory(model) -> int:
    """Bytes of every decoder weight held on the device: parameters (a tied LM head once) and buffers, and
    quantized linears' packed weights (their transposed copies included)."""
    from models.quantized import QuantLinear

    d = model.decoder
    tensors = [*d.parameters(), *d.buffers()]  # each shared tensor once
    packed = sum(m.packed_bytes() for m in d.modules() if isinstance(m, QuantLinear))
    return packed + sum(t.numel() * t.element_size() for t in tensors)


def quantize_decoder(model, scheme: str, dtype: torch.dtype, device) -> tuple[list[str], int | None]:
    """Replace every linear of the decoder (trunk and head) by a ``QuantLinear`` rounded as the export rounds
    (``rtn_quantize``; the head's with the transposed copy V-Reason's backward uses), packed for ``device``,
    and the embedding by an int8-per-row table, as a quantized export holds them. Returns the kernels used and,
    on CUDA, the most device memory packing one linear took beyond what it holds after (the transient a load
    adds on top of the weights; None elsewhere)."""
    from export.quantize import DEFAULT_BLOCK, Quantization
    from models.quantized import QuantEmbedding, QuantLinear, backward_block, rtn_quantize

    q = Quantization(scheme, DEFAULT_BLOCK).resolve(model.decoder.cfg, "fp16")
    d = model.decoder
    kernels: set[str] = set()
    transient: int | None = None
    last = len(d.layers) - 1
    jobs = [(layer, name, i == last) for i, layer in enumerate(d.layers)
            for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)] + [(d, "lm_head", True)]
    for owner, name, in_head in jobs:
        lin = owner.get_submodule(name)
        w = lin.weight.detach()
        t = rtn_quantize(w, q.bits, q.block_size)
        bwd = backward_block(w.shape[0], q.block_size)
        if in_head:
            t.update({f"bwd_{k}": v for k, v in rtn_quantize(w.t(), q.bits, bwd).items()})
        if lin.bias is not None:
            t["bias"] = lin.bias.detach()
        layer = QuantLinear(lin.in_features, lin.out_features, q.bits, q.block_size, t, bwd)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        layer.pack(device, dtype, name)
        if device.type == "cuda":
            after = torch.cuda.memory_allocated(device)
            transient = max(transient or 0, torch.cuda.max_memory_allocated(device) - max(before, after))
        kernels |= layer.kernels()
        owner.set_submodule(name, layer)
        del lin, w, t
    table = QuantEmbedding.quantize(d.embed_tokens.weight)
    d.embed_tokens = QuantEmbedding(table["codes"].to(device), table["scales"].to(device, dtype))
    model.head.embed_tokens = d.embed_tokens
    model.head.lm_head, model.head.tied = d.lm_head, False
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(kernels), transient


class Runner:
    """One model, one prompt; runs a decode loop the way ``Reasoner`` does and times it."""

    def __init__(self, model, cfg, dtype, device, prompt, new_tokens: int):
        from runtime.backends.torch_ref import TorchBackend

        self.model, self.cfg, self.dtype, self.device = model, cfg, dtype, device
        self.backend = TorchBackend(model, dtype, str(device))
        self.ids, self.positions, self.video, self.next_position = prompt
        self.new_tokens = new_tokens
        self.sessions: dict = {}
        self.caches: dict = {}

    def run(self, kind: str, method: str = "base", graphs: bool = True, compile: bool = False,
            controller=None) -> dict:
        from controller import VReason, VReasonConfig
        from runtime.bench.measure import peak_rss, reset_peak_rss
        from runtime.cache import KVCache
        from runtime.generate import DecodeState, Loop
        from runtime.sampling import SamplingParams
        from runtime.static import StaticLoop, static_capacity

        t = self.cfg.text
        cap = static_capacity(len(self.ids) + self.new_tokens)
        if kind == "static":
            cache = self.caches.get(cap)  # kept across runs, as a Reasoner keeps it across requests
            if cache is None:
                cache = self.caches[cap] = KVCache.allocate(t.num_hidden_layers, cap, t.num_key_value_heads,
                                                            t.head_dim, self.dtype, self.device)
            cache.length = 0
        else:
            cache = KVCache.allocate(t.num_hidden_layers, cap, t.num_key_value_heads, t.head_dim, self.dtype,
                                     self.device)
        head = self.model.head
        state = DecodeState(head, cache, self.video)
        lite = method == "vreason-lite"
        steering = None if method == "base" else VReason(controller or VReasonConfig(), state, lite=lite)
        if kind == "static":
            loop = StaticLoop(self.backend, head, steering, cuda_graphs=graphs and self.device.type == "cuda",
                              chunk=self.new_tokens, compile=compile,
                              sessions=self.sessions.setdefault((graphs, compile), {}))
        else:
            loop = Loop(self.backend, head, steering)
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        with torch.no_grad():
            embeds = head.embed(self.ids.view(1, -1)).clone()
            g = torch.Generator(device=self.device).manual_seed(1)
            embeds[0, self.video] = (0.02 * torch.randn(len(self.video), t.hidden_size, generator=g,
                                                        device=self.device)).to(self.dtype)
        toks = list(loop.run(state, embeds, self.positions, self.next_position, self.new_tokens, SamplingParams(),
                             set()))
        ids = [tok.id for tok in toks]
        tm = loop.timings
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else peak_rss()
        return {"prefill_s": tm.prefill_s, "decode_s_per_token": tm.decode_s / max(tm.decode_tokens - 1, 1),
                "peak_memory_bytes": peak, "capture_s": getattr(loop, "capture_s", 0.0), "tokens": ids,
                "alpha": [float(t.alpha) for t in toks], "skipped": getattr(loop.steering, "skipped", 0)}


def head_pass_seconds(runner: Runner, repeats: int = 20) -> float:
    """One head forward (last layer over the cache + LM head) for one token, median; a CUDA graph on CUDA."""
    t = runner.cfg.text
    dev, dt = runner.device, runner.dtype
    cap = len(runner.ids) + runner.new_tokens
    h = torch.randn(1, 1, t.hidden_size, dtype=dt, device=dev)
    pos = torch.zeros((3, 1, 1), dtype=torch.long, device=dev)
    kc = torch.randn(1, cap, t.num_key_value_heads, t.head_dim, dtype=dt, device=dev)
    vc = kc.clone()
    idx = torch.tensor([cap - 1], device=dev)
    head = runner.model.head

    def body():
        with torch.no_grad():
            head.step(h, pos, kc, vc, idx)

    body()
    if dev.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        body = graph.replay
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        body()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transformers_decode(raw_config: dict, dtype, device, ids: torch.Tensor, new_tokens: int, repeats: int,
                        visual_ids: tuple[int, ...]) -> dict:
    """transformers' eager generate on a random model of the same shape (text tokens of the same length)."""
    import transformers
    from transformers import LogitsProcessor, LogitsProcessorList

    config_class, model_class = TRANSFORMERS_CLASSES[raw_config["model_type"]]
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the other model, not counted
    conf = getattr(transformers, config_class).from_dict(raw_config)
    conf._attn_implementation = "eager"
    with torch.device(device):
        model = getattr(transformers, model_class)._from_config(conf, dtype=dtype).eval()
    text_ids = ids.clone()
    text_ids[torch.isin(text_ids, torch.tensor(visual_ids, device=text_ids.device))] = 100  # text, same length
    kw = {"input_ids": text_ids.view(1, -1), "attention_mask": torch.ones_like(text_ids.view(1, -1))}

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.times.append(time.perf_counter())
            return scores

    def gen(n):
        clock = Clock()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]))
        return clock.times[0] - t0, (clock.times[-1] - clock.times[0]) / max(len(clock.times) - 1, 1)

    gen(2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [gen(new_tokens) for _ in range(repeats)]
    peak = int(torch.cuda.max_memory_allocated(device)) - held if device.type == "cuda" else 0
    return {"prefill_s": statistics.median(r[0] for r in runs),
            "decode_s_per_token": statistics.median(r[1] for r in runs), "peak_memory_bytes": peak, "capture_s": 0.0}


def measure_scheme(cfg, scheme: str, dtype, device, prompt, args, dynamic: bool, measured=None) -> dict:
    """Every row of one weight scheme (none, int8, int4) on a fresh random decoder: decode loops, V-Reason and
    Lite, the head pass, bytes read per step and weights held. ``measured(name, runs)`` is called after each
    row."""
    from runtime.reasoner import fuse_projections

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_decoder(cfg, dtype, device)
    if device.type == "cuda":
        fuse_projections(model)
    kernels, pack_transient = quantize_decoder(model, scheme, dtype, device) if scheme != "none" else ([], None)
    build_s = time.perf_counter() - t0
    runner = Runner(model, cfg, dtype, device, prompt, args.new_tokens)
    rows: dict[str, list[dict]] = {}
    first_capture: dict[str, float] = {}
    label = "" if scheme == "none" else f"{scheme} "

    def measure(name, *a, **kw):
        warm = [runner.run(*a, **kw) for _ in range(args.warmup)]
        rows[label + name] = [runner.run(*a, **kw) for _ in range(args.repeats)]
        first_capture[label + name] = (warm or rows[label + name])[0]["capture_s"]
        tps = 1 / statistics.median(r["decode_s_per_token"] for r in rows[label + name])
        print(f"measured {label + name}: {tps:.1f} decode tokens/s", file=sys.stderr)
        if measured is not None:
            measured(label + name, rows[label + name])

    if dynamic:
        measure("dynamic", "dynamic")
    measure("static", "static")
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        runner.run("static", compile=True)
        compile_s = time.perf_counter() - t0
        measure("static+compile", "static", compile=True)
    best = label + ("static+compile" if args.compile else "static")
    measure("vreason", "static", "vreason", compile=args.compile)
    measure("vreason-lite", "static", "vreason-lite", compile=args.compile)
    out = {"rows": rows, "first_capture": first_capture, "compile_s": compile_s, "best": best,
           "head_pass_s": head_pass_seconds(runner), "bytes_per_token": decode_bytes(model),
           "weights_bytes": weights_in_memory(model), "build_s": build_s, "kernels": kernels,
           "pack_transient_bytes": pack_transient}
    if dynamic:
        out["identical"] = {k: rows[k][0]["tokens"] == rows[label + "dynamic"][0]["tokens"] for k in rows
                            if k.startswith(label + "static")}
    return out


def run_synthetic(args) -> dict:
    from export.quantize import SCHEMES
    from models.checkpoint import resolve_dtype

    cfg, raw = load_config(args.synthetic)
    device = torch.device(args.device)  # checked by the CLI (models.checks.check_device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    schemes = list(dict.fromkeys(getattr(args, "quantize", None) or ["none"]))
    bad = [q for q in schemes if q not in SCHEMES]
    if bad:
        raise UserError(f"--quantize {bad[0]!r}: choose from {', '.join(SCHEMES)}")
    prompt = synthetic_prompt(cfg, args.prompt_tokens, device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else _cpu_read_bandwidth()
    save = Progress(getattr(args, "save", None), {
        "synthetic": args.synthetic, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "prompt_tokens": len(prompt[0]), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "schemes": schemes, "bandwidth_gb_s": bandwidth / 1e9})
    per = {}
    for i, q in enumerate(schemes):  # one decoder at a time on the device
        per[q] = measure_scheme(cfg, q, dtype, device, prompt, args, dynamic=(i == 0), measured=save.row)
        save.scheme(q, per[q])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = {k: v for p in per.values() for k, v in p["rows"].items()}
    scheme_of = {k: q for q, p in per.items() for k in p["rows"]}
    if args.transformers:
        visual_ids = (cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        rows["transformers"] = [transformers_decode(raw, dtype, device, prompt[0], args.new_tokens, args.repeats,
                                                    visual_ids)]
        scheme_of["transformers"] = "none"
        print("measured transformers", file=sys.stderr)
        save.row("transformers", rows["transformers"])
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("prefill_s", "decode_s_per_token",
                                                               "peak_memory_bytes", "capture_s")}
           for k, v in rows.items()}
    decode = {k: 1.0 / v["decode_s_per_token"] for k, v in med.items()}
    # per scheme, at its own bytes per step (transformers reads the unquantized rows' weights)
    roofline = {q: bandwidth / p["bytes_per_token"] for q, p in per.items()}
    first = schemes[0]
    best = {q: p["best"] for q, p in per.items()}

    def ratio_by_scheme(key):
        return {q: med[f"{'' if q == 'none' else q + ' '}{key}"]["decode_s_per_token"]
                / med[best[q]]["decode_s_per_token"] for q in schemes}

    def memory_ratio(key):
        return {q: _ratio(med[f"{'' if q == 'none' else q + ' '}{key}"]["peak_memory_bytes"],
                          med[best[q]]["peak_memory_bytes"]) for q in schemes}

    update_s = {q: (med[f"{'' if q == 'none' else q + ' '}vreason"]["decode_s_per_token"]
                    - med[best[q]]["decode_s_per_token"]) * 2 for q in schemes}
    base = per.get("none")
    return {
        "synthetic": args.synthetic, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "prompt_tokens": len(prompt[0]), "video_tokens": len(prompt[2]),
        "new_tokens": args.new_tokens, "repeats": args.repeats, "schemes": schemes,
        "build_s": {q: p["build_s"] for q, p in per.items()},
        "kernels": {q: p["kernels"] for q, p in per.items()},
        "pack_transient_bytes": {q: p["pack_transient_bytes"] for q, p in per.items()},
        "bandwidth_gb_s": bandwidth / 1e9, "bandwidth_kind": "copy (read + write)" if device.type == "cuda" else "read",
        "weight_bytes_per_token": {q: p["bytes_per_token"] for q, p in per.items()},
        "weights_in_memory_bytes": {q: p["weights_bytes"] for q, p in per.items()},
        "weights_in_memory_ratio": {q: p["weights_bytes"] / base["weights_bytes"] for q, p in per.items()}
        if base else {},
        "decode_roofline_tokens_per_s": roofline,
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": {k: len(prompt[0]) / v["prefill_s"] for k, v in med.items()},
        "decode_roofline_fraction": {k: v / roofline[scheme_of[k]] for k, v in decode.items()
                                     if scheme_of[k] in roofline},
        "speedup_over_transformers": {k: v / decode["transformers"] for k, v in decode.items()}
        if "transformers" in decode else {},
        "speedup_over_unquantized": {q: decode[best[q]] / decode[base["best"]] for q in schemes} if base else {},
        "peak_memory_bytes": {k: v["peak_memory_bytes"] for k, v in med.items()},
        "capture_s_per_request": {k: v["capture_s"] for k, v in med.items()},
        "first_request_capture_s": {k: v for p in per.values() for k, v in p["first_capture"].items()},
        "compile_s": {q: p["compile_s"] for q, p in per.items()} if args.compile else None,
        "vreason_base": best,
        "vreason_token_time_ratio": ratio_by_scheme("vreason"),
        "vreason_lite_token_time_ratio": ratio_by_scheme("vreason-lite"),
        "vreason_peak_memory_ratio": memory_ratio("vreason"),
        "vreason_lite_peak_memory_ratio": memory_ratio("vreason-lite"),
        "head_pass_s": {q: p["head_pass_s"] for q, p in per.items()},
        "vreason_update_s": update_s,
        "vreason_update_cost_head_passes": {q: update_s[q] / per[q]["head_pass_s"] for q in schemes},
        "tokens_identical_to_dynamic": per[first]["identical"],
        "complete": True,
    }


class Progress:
    """``--save PATH``: what has been measured so far, rewritten to PATH (JSON) after every row and every weight
    scheme, so that a run stopped before its end (a time limit on a lent GPU) leaves each row it finished, with
    "complete": false; the caller writes the whole report over it at the end (``write_report``)."""

    def __init__(self, path, head: dict) -> None:
        self.path = path
        self.report = {**head, "complete": False, "rows": {}, "by_scheme": {}}

    def row(self, name: str, runs: list[dict]) -> None:
        self.report["rows"][name] = {
            "decode_tokens_per_s": 1.0 / statistics.median(r["decode_s_per_token"] for r in runs),
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
            "capture_s": statistics.median(r["capture_s"] for r in runs)}
        self._write()

    def scheme(self, q: str, measured: dict) -> None:
        self.report["by_scheme"][q] = {k: measured[k] for k in (
            "build_s", "compile_s", "kernels", "head_pass_s", "bytes_per_token", "weights_bytes",
            "pack_transient_bytes")}
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            from runtime.bench.measure import write_report

            write_report(self.path, self.report)


def synthetic_table(rep: dict) -> str:
    lines = [f"synthetic {rep['synthetic']} ({rep['dtype']}, random weights) on {rep['device']}, torch {rep['torch']}: "
             f"prompt {rep['prompt_tokens']} tokens ({rep['video_tokens']} video), {rep['new_tokens']} new tokens, "
             f"median of {rep['repeats']}", "",
             "| path | decode tok/s | ms/token | roofline | vs transformers | prefill tok/s | peak memory (GB) |",
             "|---|---|---|---|---|---|---|"]
    for k, tps in rep["decode_tokens_per_s"].items():
        roof = rep["decode_roofline_fraction"].get(k)
        lines.append(f"| {k} | {tps:.1f} | {1e3 / tps:.2f} | {'-' if roof is None else f'{100 * roof:.0f}%'} | "
                     f"{rep['speedup_over_transformers'].get(k, float('nan')):.2f}x | "
                     f"{rep['prefill_tokens_per_s'][k]:.0f} | {rep['peak_memory_bytes'][k] / 1e9:.2f} |")
    lines += ["", f"bandwidth {rep['bandwidth_gb_s']:.0f} GB/s ({rep['bandwidth_kind']})", "",
              "| weights | GB read per step | roofline tok/s | weights in memory (GB) | vs unquantized: memory | "
              "decode | V-Reason / Lite per token | V-Reason / Lite peak memory | update (head passes) | kernels | "
              "packing transient (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    transient = rep.get("pack_transient_bytes", {})
    for q in rep["schemes"]:
        mem_ratio = rep["weights_in_memory_ratio"].get(q)
        speed = rep["speedup_over_unquantized"].get(q)
        lines.append(
            f"| {q} | {rep['weight_bytes_per_token'][q] / 1e9:.3f} | {rep['decode_roofline_tokens_per_s'][q]:.1f} | "
            f"{rep['weights_in_memory_bytes'][q] / 1e9:.3f} | {'-' if mem_ratio is None else f'x{mem_ratio:.3f}'} | "
            f"{'-' if speed is None else f'x{speed:.2f}'} | x{rep['vreason_token_time_ratio'][q]:.3f} / "
            f"x{rep['vreason_lite_token_time_ratio'][q]:.3f} | x{rep['vreason_peak_memory_ratio'][q]:.3f} / "
            f"x{rep['vreason_lite_peak_memory_ratio'][q]:.3f} | {rep['vreason_update_cost_head_passes'][q]:.2f} "
            f"({1e3 * rep['head_pass_s'][q]:.2f} ms each) | {', '.join(rep['kernels'][q]) or 'dense'} | "
            f"{'-' if transient.get(q) is None else f'{transient[q] / 1e6:.0f}'} |")
    lines += ["", f"V-Reason rows run on each scheme's best static row ({', '.join(rep['vreason_base'].values())}); "
              f"static tokens identical to dynamic: {rep['tokens_identical_to_dynamic']}; graph capture (first "
              "request only; later requests of the same shape replay): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in rep["first_request_capture_s"].items())]
    if rep["compile_s"]:
        lines.append("torch.compile, first request: "
                     + ", ".join(f"{q} {v:.1f} s" for q, v in rep["compile_s"].items()))
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def _cpu_read_bandwidth() -> float:
    from runtime.bench.measure import read_bandwidth

    return read_bandwidth(1 << 28)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
