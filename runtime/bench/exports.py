"""The benchmark of exports: each backend against transformers' own generate, side by side in one run on the
same checkpoint and inputs, with the decode roofline, V-Reason's cost and what reuse saves (``python -m
runtime.bench --engine ...``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from models.errors import UserError
from runtime.bench.measure import median_of, peak_rss, ratio, read_bandwidth, reset_peak_rss, resident_bytes, sync

WORKLOAD = "Which direction does the red circle move?"


def bench_clip(work: Path, seconds: float) -> Path:
    """The benchmark's clip (the red circle of ``WORKLOAD``), written under ``work``."""
    from models.samples import sample_video

    return sample_video(work / "bench-clip.mp4", "circle", "red", "right", seconds=seconds, size=(224, 224))


def weight_bytes_per_token(engine: Path, reasoner) -> int:
    """Trunk weights + the head's last layer, norm and LM head: what every decode step reads (quantized
    weights as stored: codes plus scales; the embedding's one row is left out)."""
    import onnx

    m = onnx.load(str(engine / "trunk.onnx"), load_external_data=False)
    trunk = sum(f.stat().st_size for f in engine.glob("trunk.onnx.data"))
    trunk += sum(len(t.raw_data) for t in m.graph.initializer if t.raw_data)
    return trunk + head_bytes_per_token(reasoner.head)


def head_bytes_per_token(head) -> int:
    from models.quantized import QuantLinear

    def size(*ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    total = 0
    for mod in [head.layer, head.norm, head.lm_head]:
        for sub in mod.modules():
            if isinstance(sub, QuantLinear):  # the forward copy (the transposed one is read by V-Reason updates)
                total += sub.forward_bytes()
            elif not list(sub.children()):
                total += size(*sub.parameters(recurse=False))
    return total


def export_bytes(engine: Path) -> int:
    return sum(f.stat().st_size for f in engine.iterdir() if f.is_file())


class TimedSteering:
    """Wraps a V-Reason controller to time its update steps (alpha != 0)."""

    def __init__(self, inner):
        self.inner, self.update_times = inner, []
        self.tracker = inner.tracker

    def head_values(self, state, values):
        return self.inner.head_values(state, values)

    def after_prefill(self, state):
        self.inner.after_prefill(state)

    def needs_graph(self, step):
        return self.inner.needs_graph(step)

    def step(self, state, logits, recompute):
        t = time.perf_counter()
        out = self.inner.step(state, logits, recompute)
        if out[1] != 0:
            sync(state.cache.keys[0].device)
            self.update_times.append(time.perf_counter() - t)
        return out


def run_once(r, prompt, new_tokens: int, method: str = "base") -> dict:
    from runtime.cache import KVCache
    from runtime.generate import DecodeState, Loop
    from runtime.sampling import SamplingParams

    reset_peak_rss()
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(r.device)
    t0 = time.perf_counter()
    embeds, deepstack, vision_s, _ = r._prefill_inputs(prompt)
    t = r.cfg.text
    cache = KVCache.allocate(t.num_hidden_layers, len(prompt.ids) + new_tokens, t.num_key_value_heads, t.head_dim,
                             r.dtype, r.device, head_major=r.backend.head_major_layers)
    state = DecodeState(r.head, cache, prompt.video_token_index.to(r.device), deepstack=deepstack)
    steering = r.steering_for(method, None, state)
    timed = TimedSteering(steering) if steering is not None else None
    loop = Loop(r.backend, r.head, timed)
    first = None
    for i, _ in enumerate(loop.run(state, embeds, prompt.positions.unsqueeze(1).to(r.device), prompt.next_position,
                                   new_tokens, SamplingParams(), set())):
        if i == 0:
            first = time.perf_counter() - t0
    tm = loop.timings
    peak = int(torch.cuda.max_memory_allocated(r.device)) if r.device.type == "cuda" else peak_rss()
    return {"vision_s": vision_s, "prefill_s": tm.prefill_s, "ttft_s": first,
            "decode_s_per_token": tm.decode_s / max(tm.decode_tokens - 1, 1), "peak_memory_bytes": peak,
            "update_s": statistics.median(timed.update_times) if timed and timed.update_times else None}


def head_pass_seconds(r, prompt_len: int, repeats: int = 20) -> float:
    """Median time of one head forward for one token over a cache of ``prompt_len`` entries, in the form a decode
    step runs it: the backend's head graph where it has one (``base_head``: ONNX Runtime on CPU), else the
    PyTorch head."""
    from runtime.cache import KVCache

    t = r.cfg.text
    h = torch.randn(1, 1, t.hidden_size, dtype=r.dtype, device=r.device)
    pos = torch.full((3, 1, 1), prompt_len, dtype=torch.long, device=r.device)
    k = torch.randn(1, prompt_len, t.num_key_value_heads, t.head_dim, dtype=r.dtype, device=r.device)
    graph = getattr(r.backend, "base_head", None)
    if graph is not None:
        cache = KVCache.allocate(1, prompt_len + 1, t.num_key_value_heads, t.head_dim, r.dtype, r.device,
                                 head_major=int(graph.head_major))  # the layout the graph reads
        cache.keys[0][:, :prompt_len] = k
        cache.values[0][:, :prompt_len] = k
        cache.length = prompt_len + 1

        def one():
            graph(h, pos, cache, 0, write=False)
    else:
        def one():
            r.head(h, pos, k, k, last_only=True)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            one()
            sync(r.device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_transformers(src: Path, prompt, new_tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    import transformers

    from models.checkpoint import read_config
    from runtime.bench.synthetic import TRANSFORMERS_CLASSES

    model_type = read_config(src)["model_type"]
    model_class = getattr(transformers, TRANSFORMERS_CLASSES[model_type][1])
    model = model_class.from_pretrained(src, dtype=dtype, attn_implementation="eager", use_safetensors=True).eval()
    ids = torch.tensor([prompt.ids])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.visuals:
        v = prompt.visuals[0]
        kw |= {"pixel_values_videos": v.pixel_values.to(dtype), "video_grid_thw": torch.tensor([v.span.grid_thw]),
               "mm_token_type_ids": 2 * (ids == model.config.video_token_id).int()}
        if model_type == "qwen2_5_vl":  # time in its position ids (Qwen3-VL: in the prompt's timestamps)
            kw["second_per_grid_ts"] = torch.tensor([v.span.seconds_per_grid])

    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        """Timestamps each call: the first comes right after prefill, then one per decode step."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def gen(n):
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]))
        return clock.times[0] - t0, (clock.times[-1] - clock.times[0]) / max(len(clock.times) - 1, 1)

    gen(2)  # warm-up
    reset_peak_rss()
    runs = [gen(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    return {"ttft_s": ttft, "prefill_s": ttft, "decode_s_per_token": statistics.median(r[1] for r in runs),
            "peak_memory_bytes": peak_rss(), "vision_s": None}


def run(args) -> dict:
    from runtime.backends import tensorrt_usable
    from runtime.bench.measure import load

    engine = Path(args.engine)
    backends = args.backend or (["trt"] if tensorrt_usable(engine)[0] else []) + ["ort"]
    work = Path(args.work)
    video = bench_clip(work, args.seconds)
    results: dict[str, dict] = {}
    reasoners = {}
    bandwidth = read_bandwidth()
    for name in backends:
        r = load(engine, args.hugepages, backend=name, reuse_mb=0,  # cold requests: nothing reused between runs
                 ort_trunk=args.ort_trunk)
        reasoners[name] = r
        prompt = r.prepare(question=WORKLOAD, video=video, max_new_tokens=args.new_tokens)
        for _ in range(args.warmup):
            run_once(r, prompt, args.new_tokens)
        runs = [run_once(r, prompt, args.new_tokens) for _ in range(args.repeats)]
        results[name] = {k: median_of(runs, k) for k in ("vision_s", "prefill_s", "ttft_s", "decode_s_per_token",
                                                          "peak_memory_bytes")}
        results[name]["prompt_tokens"] = len(prompt.ids)
        if name == "ort":  # which graphs ran: the trunk's ORT-only form or the standard one, the head's graph
            results[name]["graphs"] = {"trunk": r.backend.trunk_form,
                                       "head": "onnxruntime" if r.backend.base_head is not None else "pytorch"}
        print(f"measured {name}", file=sys.stderr)
    default = backends[0]
    r = reasoners[default]
    prompt = r.prepare(question=WORKLOAD, video=video, max_new_tokens=args.new_tokens)
    if args.transformers and not args.model:  # the export's recorded source folder is never opened on its own
        src = r.manifest.get("source_model", "an unrecorded folder")
        print(f"note: no transformers baseline; pass --model CHECKPOINT (this export was made from {src!r}) to "
              "measure it side by side", file=sys.stderr)
        args.transformers = False
    if args.transformers:
        src = Path(args.model).expanduser()
        if not (src / "config.json").is_file():
            raise UserError(f"--model {src} has no config.json; pass the checkpoint the export was made from")
        results["transformers"] = bench_transformers(src, prompt, args.new_tokens, args.repeats, r.dtype)
        results["transformers"]["prompt_tokens"] = len(prompt.ids)
        print("measured transformers", file=sys.stderr)
    held = resident_bytes(r.device)  # what the first V-Reason request leaves held (its sessions, its state)
    vr_runs = [run_once(r, prompt, args.new_tokens, "vreason")]
    vreason_added = resident_bytes(r.device) - held
    vr_runs += [run_once(r, prompt, args.new_tokens, "vreason") for _ in range(args.repeats - 1)]
    base_runs = [run_once(r, prompt, args.new_tokens, "base") for _ in range(args.repeats)]
    head_s = head_pass_seconds(r, len(prompt.ids) + args.new_tokens // 2)
    per_token_bytes = weight_bytes_per_token(engine, r)
    roofline = bandwidth / per_token_bytes
    decode = {k: 1.0 / v["decode_s_per_token"] for k, v in results.items()}
    report = {
        "machine": {"torch_threads": torch.get_num_threads(), "read_bandwidth_gb_s": bandwidth / 1e9,
                    "device": str(r.device)},
        "engine": str(engine), "model_type": r.manifest["model_type"], "precision": r.manifest["precision"],
        "weights": r.weights,
        "export_bytes": export_bytes(engine), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "backends": results,
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": {k: v["prompt_tokens"] / v["prefill_s"] for k, v in results.items()},
        "ttft_s": {k: v["ttft_s"] for k, v in results.items()},
        "vision_s": {k: v["vision_s"] for k, v in results.items() if v["vision_s"] is not None},
        "peak_memory_bytes": {k: v["peak_memory_bytes"] for k, v in results.items()},
        "weight_bytes_per_token": per_token_bytes, "decode_roofline_tokens_per_s": roofline,
        "decode_roofline_fraction": {k: decode[k] / roofline for k in results},
        "speedup_over_transformers": {k: decode[k] / decode["transformers"] for k in results} if args.transformers
        else {},
        "vreason_backend": default,
        "vreason_token_time_ratio": ratio(vr_runs, base_runs, "decode_s_per_token"),
        "vreason_peak_memory_ratio": ratio(vr_runs, base_runs, "peak_memory_bytes"),
        "vreason_first_use_bytes": vreason_added,
        "head_pass_s": head_s,
        "vreason_update_s": median_of(vr_runs, "update_s"),
        "vreason_update_cost_head_passes": median_of(vr_runs, "update_s") / head_s,
        "reuse": reuse_figures(engine, default, args.new_tokens, args.repeats, r),
    }
    return report


REUSE_QUESTION = "What color is the moving shape?"


def reuse_figures(engine: Path, backend: str, new_tokens: int, repeats: int, cold) -> dict:
    """What reuse saves on one clip (16 frames of 224x224 at 2 fps, as caller frames): time to the first token of
    a second, different question on the same clip and of the same question again, over the first question's;
    vision time of a window overlapping the last one by half, over a cold window's. Medians of ``repeats`` rounds,
    each starting from an empty reuse store; the answers with reuse are compared with ``cold`` (reuse off)."""
    import numpy as np

    from models.samples import render_frames
    from runtime.reasoner import Reasoner

    clip = [f[:, :, ::-1].copy() for f in render_frames("circle", "red", "right", frames=24, size=(224, 224))]
    a, b = clip[:16], clip[8:24]
    r = Reasoner.load(engine, backend=backend, reuse_mb=1024, verify=False)

    def ask(frames, question):
        return r.ask(frames=frames, fps=2.0, question=question, max_new_tokens=new_tokens)

    rounds = []
    for i in range(repeats + 1):  # the first round warms up
        r.reuse.clear()
        first, second, same, shifted = ask(a, WORKLOAD), ask(a, REUSE_QUESTION), ask(a, WORKLOAD), ask(b, WORKLOAD)
        if i:
            rounds.append({"first": first, "second": second, "same": same, "shifted": shifted})
    med = {k: statistics.median(x[k].timings["ttft_s"] for x in rounds) for k in ("first", "second", "same")}
    vision = {k: statistics.median(x[k].timings["vision_s"] for x in rounds) for k in ("first", "shifted")}
    last = rounds[-1]
    pairs = [(last["second"], cold.ask(frames=a, fps=2.0, question=REUSE_QUESTION, max_new_tokens=new_tokens)),
             (last["shifted"], cold.ask(frames=b, fps=2.0, question=WORKLOAD, max_new_tokens=new_tokens)),
             (last["same"], last["first"])]
    apart, diff = [], 0.0  # where the pairs' answers part; their entropies' distance before that
    for x, y in pairs:
        k = first_difference(x.token_ids, y.token_ids)
        n = min(len(x.token_ids), len(y.token_ids)) if k is None else k
        if n:
            diff = max(diff, float(np.max(np.abs(np.subtract(x.entropy[:n], y.entropy[:n])))))
        if k is not None:
            apart.append(k)
    return {
        "prompt_tokens": len(last["first"].prompt_token_ids),
        "ttft_first_s": med["first"], "ttft_second_question_s": med["second"], "ttft_same_question_s": med["same"],
        "second_question_ttft_ratio": med["second"] / med["first"],
        "same_question_ttft_ratio": med["same"] / med["first"],
        "reused_prompt_tokens_second_question": last["second"].timings["reused_prompt_tokens"],
        "vision_cold_s": vision["first"], "vision_half_overlap_s": vision["shifted"],
        "half_overlap_vision_ratio": vision["shifted"] / vision["first"],
        "reused_vision_patches_half_overlap": last["shifted"].timings["reused_vision_patches"],
        "tokens_equal_without_reuse": not apart,
        "first_different_token": min(apart) if apart else None,  # of ``new_tokens``, over the three pairs
        "max_entropy_difference": diff,  # over the tokens before the answers part
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (one ending before the other counts); None if equal."""
    k = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
    return k if k is not None or len(a) == len(b) else min(len(a), len(b))


def table(rep: dict) -> str:
    rows = ["| backend | vision (s) | prefill tok/s | decode tok/s | TTFT (s) | peak memory (MB) | roofline | "
            "vs transformers |", "|---|---|---|---|---|---|---|---|"]
    for k in rep["backends"]:
        vis = rep["vision_s"].get(k)
        rows.append(f"| {k} | {'-' if vis is None else f'{vis:.3f}'} | {rep['prefill_tokens_per_s'][k]:.1f} | "
                    f"{rep['decode_tokens_per_s'][k]:.2f} | {rep['ttft_s'][k]:.3f} | "
                    f"{rep['peak_memory_bytes'][k] / 1e6:.0f} | {100 * rep['decode_roofline_fraction'][k]:.0f}% | "
                    f"{rep['speedup_over_transformers'].get(k, float('nan')):.2f}x |")
    rows.append("")
    rows.append(f"read bandwidth {rep['machine']['read_bandwidth_gb_s']:.1f} GB/s, "
                f"{rep['weight_bytes_per_token'] / 1e9:.2f} GB read per decode step -> roofline "
                f"{rep['decode_roofline_tokens_per_s']:.2f} tokens/s")
    rows.append(f"V-Reason on {rep['vreason_backend']}: per-token time x{rep['vreason_token_time_ratio']:.2f}, "
                f"peak memory x{rep['vreason_peak_memory_ratio']:.3f}{first_use(rep)}, one update = "
                f"{rep['vreason_update_cost_head_passes']:.2f} head passes "
                f"({1e3 * rep['vreason_update_s']:.1f} ms; head pass {1e3 * rep['head_pass_s']:.1f} ms)")
    rows.append(reuse_line(rep["reuse"], rep["vreason_backend"]))
    return "\n".join(rows)


def first_use(rep: dict) -> str:
    """What V-Reason's first request left held, beside the per-request peak ratio (which compares requests of a
    process where both have run)."""
    added = rep.get("vreason_first_use_bytes")
    return "" if added is None else f" per request (its first request left {added / 2**20:.0f} MiB more held)"


def reuse_line(u: dict, backend: str) -> str:
    return (f"Reuse on {backend} ({u['prompt_tokens']}-token prompt, 16 frames): time to first token "
            f"{u['ttft_first_s']:.3f} s; another question on the clip x{u['second_question_ttft_ratio']:.3f} "
            f"({u['reused_prompt_tokens_second_question']} tokens restored), the same question again "
            f"x{u['same_question_ttft_ratio']:.3f}; a half-overlapping window's vision "
            f"x{u['half_overlap_vision_ratio']:.2f} ({u['reused_vision_patches_half_overlap']} of 8 patches reused); "
            + (f"answers equal without reuse (entropy within {u['max_entropy_difference']:.1e})"
               if u["tokens_equal_without_reuse"] else
               f"answers without reuse part at token {u['first_different_token']} (entropy within "
               f"{u['max_entropy_difference']:.1e} before that)"))


def label(rep: dict) -> str:
    w = rep["weights"]
    return w["precision"] if w["quantize"] == "none" else f"{w['quantize']} ({w['precision']} activations)"


def run_many(args) -> dict:
    """Several exports side by side: each measured in its own process (so that peak memory is its own), the
    transformers baseline with the first, then onnxruntime-genai's fp32 and int4 models when installed."""
    import subprocess

    common = ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--seconds", str(args.seconds), "--work", args.work, "--json"]
    if args.backend:
        common += ["--backend", *args.backend]
    common += ["--ort-trunk", args.ort_trunk]

    def child(argv: list[str], what: str) -> dict:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"measuring {what} failed: {tail}")
        print(f"measured {what}", file=sys.stderr)
        return json.loads(done.stdout)

    reps = []
    for i, engine in enumerate(args.engine):
        extra = ["--model", args.model] if i == 0 and args.transformers and args.model else ["--no-transformers"]
        reps.append(child(["-m", "runtime.bench", "--engine", engine, *common, *extra], engine))
    families = len({r["model_type"] for r in reps}) > 1  # exports of several families: say which is which
    runs = {}
    for rep in reps:
        name = f"{rep['model_type']} {label(rep)}" if families else label(rep)
        runs[name if name not in runs else f"{name} ({rep['engine']})"] = rep
    first = next(iter(runs.values()))
    prompt = next(iter(first["backends"].values()))["prompt_tokens"]
    peer = {}
    if args.peer:
        for precision in ("fp32", "int4"):
            # the export of the same weights, if one was measured on ort: alternated with the peer in its process
            same = [r["engine"] for r in reps if "ort" in r["backends"] and peer_precision(r) == precision]
            against = ["--against", same[0], "--rounds", str(args.peer_rounds), "--seconds", str(args.seconds),
                       "--ort-trunk", args.ort_trunk] if same else []
            peer[precision] = child(["-m", "runtime.bench.peer", "--engine", args.engine[0], "--precision", precision,
                                     "--prompt-tokens", str(prompt), "--new-tokens", str(args.new_tokens),
                                     "--repeats", str(args.repeats), "--work", str(Path(args.work) / "peer"),
                                     *against, "--json"], f"onnxruntime-genai {precision}")
    rep = {"runs": runs, "peer": peer, "transformers": first["backends"].get("transformers")}
    rep["decode_vs_peer"] = {f"{name} {b}": v for (name, b), v in peer_ratios(rep).items()}
    rep["decode_vs_peer_apart"] = {f"{name} {b}": v for (name, b), v in peer_ratios(rep, apart=True).items()}
    return rep


def peer_ratios(rep: dict, apart: bool = False) -> dict[tuple[str, str], float]:
    """Decode speed of each export row over onnxruntime-genai's model of the same weights (fp32 rows over its fp32,
    int4 rows over its int4), keyed by (row, backend): the median per-round ratio of the two alternated in one
    process where the peer's run did that (``side_by_side``, the ort row of that export), else (and with
    ``apart``) the ratio of the two measured apart, minutes from each other."""
    out = {}
    for name, r in rep["runs"].items():
        peer = rep["peer"].get(peer_precision(r))
        if peer is None:
            continue
        for b, d in r["decode_tokens_per_s"].items():
            if b == "transformers":
                continue
            sbs = None if apart else alternated(rep, name, b)
            out[name, b] = sbs["ratio"] if sbs else d * peer["decode_s_per_token"]
    return out


def peer_precision(run: dict) -> str | None:
    """Which onnxruntime-genai model has a row's weights: "fp32" for unquantized fp32 rows, the scheme for
    quantized rows with fp32 activations, None for rows it has no model of."""
    w = run["weights"]
    if w["precision"] != "fp32":
        return None
    return "fp32" if w["quantize"] == "none" else w["quantize"]


def alternated(rep: dict, name: str, backend: str) -> dict | None:
    """The peer's measurement alternated with row ``name`` on ``backend`` (``side_by_side``), where there is one."""
    r = rep["runs"][name]
    sbs = (rep["peer"].get(peer_precision(r)) or {}).get("side_by_side")
    return sbs if backend == "ort" and sbs and sbs["engine"] == r["engine"] else None


def side_note(rep: dict, name: str, backend: str) -> str:
    """How a row's ratio to the peer was measured, where it was alternated with the peer."""
    sbs = alternated(rep, name, backend)
    if sbs is None:
        return ""
    return (f" (alternated in one process, {sbs['rounds']} rounds: x{sbs['ratio_min']:.2f}-x{sbs['ratio_max']:.2f}, "
            f"{sbs['decode_tokens_per_s']:.1f} against {sbs['peer_decode_tokens_per_s']:.1f} tokens/s)")


def vs(decode: float, baseline: float) -> str:
    """A speed ratio cell; "-" without a baseline (--no-transformers)."""
    return "-" if baseline != baseline else f"{decode / baseline:.2f}x"


def table_many(rep: dict) -> str:
    rows = ["| weights | backend | export size (MB) | weights/token (MB) | prefill tok/s | decode tok/s | "
            "peak memory (MB) | roofline | vs transformers |", "|---|---|---|---|---|---|---|---|---|"]
    tf = rep["transformers"]
    tf_decode = 1 / tf["decode_s_per_token"] if tf else float("nan")
    for name, r in rep["runs"].items():
        for b, v in r["backends"].items():
            if b == "transformers":
                continue
            d = r["decode_tokens_per_s"][b]
            rows.append(f"| {name} | {b} | {r['export_bytes'] / 1e6:.0f} | {r['weight_bytes_per_token'] / 1e6:.0f} | "
                        f"{r['prefill_tokens_per_s'][b]:.0f} | {d:.1f} | {v['peak_memory_bytes'] / 1e6:.0f} | "
                        f"{100 * r['decode_roofline_fraction'][b]:.0f}% | {vs(d, tf_decode)} |")
    for p, v in rep["peer"].items():
        d = 1 / v["decode_s_per_token"]
        rows.append(f"| {p} | onnxruntime-genai | {v['export_bytes'] / 1e6:.0f} | - | "
                    f"{v['prompt_tokens'] / v['ttft_s']:.0f} | {d:.1f} | {v['peak_memory_bytes'] / 1e6:.0f} | - | "
                    f"{vs(d, tf_decode)} |")
    if tf:
        rows.append(f"| fp32 | transformers eager | - | - | - | {tf_decode:.1f} | "
                    f"{tf['peak_memory_bytes'] / 1e6:.0f} | - | 1.00x |")
    rows.append("")
    peer, apart = peer_ratios(rep), peer_ratios(rep, apart=True)
    if peer:
        rows.append("decode against onnxruntime-genai at the same weights (this run): " + ", ".join(
            f"{name} {b} x{v:.2f}" + side_note(rep, name, b) for (name, b), v in peer.items()))
        rows.append("the same measured apart (each model in its own process, minutes from each other): " + ", ".join(
            f"{name} {b} x{v:.2f}" for (name, b), v in apart.items()))
    for name, r in rep["runs"].items():
        rows.append(f"V-Reason on {name} ({r['vreason_backend']}): "
                    f"per-token time x{r['vreason_token_time_ratio']:.2f}, "
                    f"peak memory x{r['vreason_peak_memory_ratio']:.3f}{first_use(r)}, one update = "
                    f"{r['vreason_update_cost_head_passes']:.2f} head passes ({1e3 * r['vreason_update_s']:.1f} ms; "
                    f"head pass {1e3 * r['head_pass_s']:.1f} ms)")
        rows.append(reuse_line(r["reuse"], r["vreason_backend"]))
    return "\n".join(rows)
