"""``python -m runtime.bench --engine DIR --concurrency 1 2 4 8``: N clients at once on one loaded model.

For each method (base, V-Reason) and each N: N threads on one ``Reasoner`` ask ``--repeats`` waves of questions
about the benchmark clip, one question each per wave, every wave started together (the levels alternate wave by
wave, so that they see the same machine state). Reported per N: aggregate generated tokens per second (all tokens
over the wall time from the first request to the last answer, prefill included), the aggregate decode rate (per wave
of N requests started together: the tokens generated while all N were decoding, from the last one's first token to
the first one's last, over that window; the median over the waves), the median per-request decode rate (its tokens
over its own decode time, others' prefill chunks run in between included), time to first token p50 / p95 (queueing
for the engine included), the median time a request waited for its place in the engine (``queue_s``) and the mean
number of requests running while it was advanced (``batch_mean``), and the KV memory the engine held at its peak
over the sum of what each request's own cache would hold (``kv_held_over_own``; the pool's rows are as long as the
longest request, rounded up to 64 entries, and on ort's quantized and standard graphs a request alone holds two
rows: ``runtime.pool``; its own cache: its prompt and new tokens, to the entry). Every answer is checked against
the same request asked alone (greedy: identical tokens). The engine keeps up to ``max_batch`` requests running;
where the backend can (``batch_rows``: every backend with dynamic decode, the torch and ort backends with static
decode too) their decode steps run as one call, one pass over the weights for all of them; elsewhere they take
turns. With ``--peer``: onnxruntime-genai's model of the export's decoder shape and weight format
(``runtime.bench.peer``, built once under --work; from the export's own weights where they are floats, and then
first checked: its greedy tokens and their entropies on a text prompt against ours) generates as many requests
together as the top level, once per round after our waves (base): its aggregate decode rate, ours, and the per-round
ratio.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

QUESTION = "Which direction does the red circle move?"


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def at_once(fn, n: int) -> tuple[list, float]:
    """``fn()`` on ``n`` threads started together: (their return values, wall seconds from the start to the last
    return). The first error any raised is raised here."""
    start = threading.Barrier(n + 1)
    results: list = []
    errors: list = []

    def client() -> None:
        try:
            start.wait()
            results.append(fn())
        except BaseException as e:  # noqa: BLE001 (raised below, in the caller)
            errors.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def together_rate(waves: list[list[list[float]]]) -> float:
    """Tokens per second while every request of a wave was decoding: per wave (each request's token times), the
    tokens after the last request's first token and up to the first request's last, over that window; the median
    over the waves that have one (0.0 if none)."""
    rates = []
    for times in waves:
        lo, hi = max(t[0] for t in times), min(t[-1] for t in times)
        if hi > lo:
            rates.append(sum(sum(1 for x in t if lo < x <= hi) for t in times) / (hi - lo))
    return statistics.median(rates) if rates else 0.0


def run_wave(r, clip: Path, method: str, n: int, new_tokens: int) -> tuple[list, float, float | None]:
    """N threads asking one question each, started together: ([(result, its tokens' arrival times)], wall s, the
    KV memory the engine held at its peak over the sum of what each request's own cache would hold, of the
    ``max_batch`` largest where more wait for a place (None where requests hold caches of their own, not rows of a
    pool))."""
    from runtime.reasoner import cache_bytes

    needs = []

    def client() -> tuple:
        s = r.stream(video=str(clip), question=QUESTION, method=method, max_new_tokens=new_tokens, template="plain",
                     events=True)
        needs.append(cache_bytes(r.cfg, len(s.prompt.ids) + new_tokens, r.dtype))  # its own, to the entry
        times = [time.perf_counter() for _event in s]
        return s.result, times[:len(s.result.token_ids)]

    if r.pool is not None:  # from empty buffers (they are kept between requests): what this wave makes it hold
        r.pool.clear()
        r.pool.peak_bytes = 0
    done, wall = at_once(client, n)
    held = sum(sorted(needs, reverse=True)[:r.max_batch])  # what the requests that can run at once would hold alone
    return done, wall, (r.pool.peak_bytes / held if r.pool is not None else None)


def per_repeat(waves: list[tuple], ones: list[tuple]) -> list[float]:
    """Each repeat's wave's aggregate decode rate (``together_rate``) over the one-client wave of the same repeat,
    where both have one."""
    def rate(wave: tuple) -> float:
        return together_rate([[t for _, t in wave[0]]])

    rates = [(rate(w), rate(o)) for w, o in zip(waves, ones)]
    return [w / o for w, o in rates if w > 0 and o > 0]


def level_row(n: int, waves: list[tuple[list, float]], solo: list[int], max_batch: int) -> dict:
    """One concurrency level's figures from its waves. With more clients than ``max_batch`` they never all decode at
    once: no aggregate decode rate (None)."""
    results = [res for done, _, _ in waves for res, _ in done]
    tokens = sum(len(res.token_ids) for res in results)
    wall = sum(w for _, w, _ in waves)
    held = [h for _, _, h in waves if h is not None]
    ttft = [res.timings["ttft_s"] for res in results]
    return {
        "clients": n, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "aggregate_decode_tokens_per_s": (together_rate([[t for _, t in done] for done, _, _ in waves])
                                          if n <= max_batch else None),
        "kv_held_over_own": max(held) if held else None,
        "per_request_decode_tokens_per_s": statistics.median(res.timings["decode_tokens_per_s"] for res in results),
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
        "queue_p50_s": statistics.median(res.timings["queue_s"] for res in results),
        "batch_mean": statistics.mean(res.timings["batch_mean"] for res in results),
        "identical_to_solo": all(res.token_ids == solo for res in results),
    }


def peer_model(r, clip: Path, args):
    """onnxruntime-genai's model of the export's decoder shape and weight format (``runtime.bench.peer``; of its
    weights where they are floats), built once under --work: (its ``once``, its precision, the prompt length it is
    given (the benchmark request's), its greedy tokens and entropies on a text prompt against ours (None where its
    weights are not the export's), the block size of its low-bit matmuls (None at fp32; an int4 export's own,
    ``peer.weight_format``))."""
    from runtime.bench.peer import against, build, float_weights, measure, weight_format

    precision = "int4" if r.weights["quantize"] == "int4" else "fp32"
    text = r.manifest["config"]["text"]
    own = float_weights(r.engine_dir)  # a float export: the peer takes its weights (``peer.export_weights``)
    prompt = len(r.prepare(video=str(clip), question=QUESTION, max_new_tokens=args.new_tokens, template="plain").ids)
    rep = measure(build(text, precision, Path(args.work), r.engine_dir if own else None, weight_format(r.engine_dir)),
                  prompt, args.new_tokens, 1, text["vocab_size"])
    # the same weights: the same greedy tokens and entropies on a text prompt
    same = against(r, rep["greedy"], QUESTION, args.new_tokens) if own else None
    return rep["once"], precision, prompt, same, rep["block_size"]


def run_concurrency(args) -> dict:
    from runtime.bench.exports import bench_clip
    from runtime.bench.measure import load

    backend = args.backend[0] if args.backend else "auto"
    levels = sorted(set(args.concurrency))
    top = levels[-1]
    # every level's clients running at once unless told otherwise (a backend with a row limit caps it: Reasoner.load)
    r = load(args.engine, args.hugepages, backend=backend, reuse_mb=0, max_batch=args.max_batch or top)
    clip = bench_clip(Path(args.work), args.seconds)
    peer = peer_model(r, clip, args) if args.peer else None
    rep = {"engine": str(args.engine), "backend": r.backend.name, "backend_reason": r.backend_reason,
           "max_batch": r.max_batch, "batched": r.pool is not None, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "levels": levels, "methods": {},
           "hugepages": r.hugepages.as_dict() if r.hugepages is not None else
           {"state": "off: --no-hugepages" if not args.hugepages else f"off: weights on {r.device.type}"}}
    for method in ("base", "vreason"):
        solo = r.ask(video=str(clip), question=QUESTION, method=method, max_new_tokens=args.new_tokens,
                     template="plain").token_ids  # also the warm-up
        waves: dict[int, list] = {n: [] for n in levels}
        rounds = []  # with the peer: (our aggregate decode rate at the top level, the peer's at its batch) per round
        for _ in range(args.repeats):  # the levels alternate, wave by wave: they see the same machine state
            for n in levels:
                waves[n].append(run_wave(r, clip, method, n, args.new_tokens))
            if peer is not None and method == "base" and top <= r.max_batch:
                step = peer[0](top)[1]
                rounds.append((together_rate([[t for _, t in waves[top][-1][0]]]), top / step))
        rows = [level_row(n, waves[n], solo, r.max_batch) for n in levels]
        for row in rows:
            rate = row["aggregate_decode_tokens_per_s"]
            print(f"measured {method} x{row['clients']}: " + (
                f"{rate:.1f} decode tokens/s in all" if rate is not None else
                f"{row['aggregate_tokens_per_s']:.1f} tokens/s in all (more clients than max_batch "
                f"{r.max_batch}: never all decoding at once)"), file=sys.stderr)
        one = rows[0]["aggregate_tokens_per_s"] if levels[0] == 1 else None
        for n, row in zip(levels, rows):
            row["aggregate_over_one_client"] = row["aggregate_tokens_per_s"] / one if one else None
            # per repeat: this level's wave over the one-client wave run just before it (the machine's speed drifts
            # by more than these differ over a run; within a repeat both waves see the same machine)
            pairs = per_repeat(waves[n], waves[1]) if levels[0] == 1 and n <= r.max_batch else []
            row["decode_over_one_client"] = statistics.median(pairs) if pairs else None
            row["decode_over_one_client_min"], row["decode_over_one_client_max"] = \
                (min(pairs), max(pairs)) if pairs else (None, None)
        rep["methods"][method] = rows
        if rounds:
            ratios = [o / p for o, p in rounds if o > 0]
            rep["peer"] = {"precision": peer[1], "prompt_tokens": peer[2], "batch": top, "block_size": peer[4],
                           "weights": "the export's" if peer[3] is not None else "random, of the export's shape",
                           "greedy_tokens": peer[3],
                           "aggregate_decode_tokens_per_s": statistics.median(p for _, p in rounds),
                           "ours_aggregate_decode_tokens_per_s": statistics.median(o for o, _ in rounds),
                           "ours_over_peer": statistics.median(ratios) if ratios else None,
                           "ours_over_peer_min": min(ratios, default=None),
                           "ours_over_peer_max": max(ratios, default=None)}
    return rep


def pages(state: dict | None) -> str:
    """The report's line end on the weights' pages (``runtime.hugepages``; nothing for a report without it)."""
    if state is None:
        return ""
    if state["state"] == "done":
        return f"; weights in 2 MB pages ({state['moved_mb']} MiB moved before measuring)"
    return f"; weights not moved into 2 MB pages ({state['state']})"


def concurrency_table(rep: dict) -> str:
    how = ("their decode steps batched (one pass over the weights per step)" if rep.get("batched") else
           "taking turns (this backend decodes one request per call)")
    lines = [f"{rep['engine']} on {rep['backend']} ({rep.get('backend_reason', '')}): {rep['new_tokens']} new tokens, "
             f"{rep['repeats']} requests per client, clients started together; one engine thread, up to "
             f"{rep['max_batch']} requests running, {how}" + pages(rep.get("hugepages")), "",
             "| method | clients | aggregate tok/s | vs 1 client | aggregate decode tok/s | vs 1 client (per repeat) | "
             "per-request decode tok/s | TTFT p50 (s) | TTFT p95 (s) | queue p50 (s) | batch mean | KV held / own | "
             "answers = solo |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(x):
        return "-" if x is None else f"x{x:.2f}"

    def rate(x):  # None: more clients than max_batch, never all decoding at once
        return "-" if x is None else f"{x:.1f}"

    def spread(row, key):  # the per-repeat median and range
        lo, hi = row.get(key + "_min"), row.get(key + "_max")
        return ratio(row[key]) + ("" if lo is None or lo == hi else f" ({ratio(lo)}-{ratio(hi)})")

    for method, rows in rep["methods"].items():
        for row in rows:
            lines.append(f"| {method} | {row['clients']} | {row['aggregate_tokens_per_s']:.1f} | "
                         f"{ratio(row['aggregate_over_one_client'])} | {rate(row['aggregate_decode_tokens_per_s'])} | "
                         f"{spread(row, 'decode_over_one_client')} | "
                         f"{row['per_request_decode_tokens_per_s']:.1f} | {row['ttft_p50_s']:.3f} | "
                         f"{row['ttft_p95_s']:.3f} | {row['queue_p50_s']:.3f} | {row['batch_mean']:.2f} | "
                         f"{ratio(row['kv_held_over_own'])} | {'yes' if row['identical_to_solo'] else 'NO'} |")
    peer = rep.get("peer")
    if peer:
        blocks = f" (blocks of {peer['block_size']})" if peer.get("block_size") else ""
        lines += ["", f"onnxruntime-genai {peer['precision']}{blocks}, {peer['batch']} requests generated together "
                  f"(equal {peer['prompt_tokens']}-token prompts), alternating with our waves of {peer['batch']}, "
                  f"base: {peer['aggregate_decode_tokens_per_s']:.1f} decode tokens/s against our "
                  f"{peer['ours_aggregate_decode_tokens_per_s']:.1f}; ours / peer per round x"
                  f"{peer['ours_over_peer']:.2f} (x{peer['ours_over_peer_min']:.2f}-x{peer['ours_over_peer_max']:.2f})"]
        same = peer.get("greedy_tokens")
        lines.append(f"its weights: {peer.get('weights', 'random')}" + (
            "" if same is None else f"; greedy tokens on a text prompt, its against ours: {same['compared']} compared, "
            f"{'equal' if same['equal'] else 'NOT equal'}, entropies within {same['entropy_max_abs_diff']:.1e}"))
    return "\n".join(lines)
