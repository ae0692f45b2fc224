"""``python -m runtime.bench --engine DIR --concurrency 1 2 4 8``: N clients at once on one loaded model.

For each method (base, V-Reason) and each N: N threads start together on one ``Reasoner``, each asking
``--repeats`` questions about the benchmark clip in turn. Reported per N: aggregate generated tokens per second
(all tokens over the wall time from the first request to the last answer, prefill included), the median
per-request decode rate, time to first token p50 / p95 (queueing for the engine included) and the median time a
request waited for its place in the engine (``queue_s``) and the mean number of requests running while it was
advanced (``batch_mean``). Every answer is checked against the same request asked alone (greedy: identical
tokens). The engine keeps up to ``max_batch`` requests running, taking turns a token or a prefill chunk at a time
(``runtime.engine``), without a shared pass over the weights: the aggregate rate shows what in-flight batching
would have to improve on.
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


def run_level(r, clip: Path, method: str, n: int, repeats: int, new_tokens: int, solo: list[int]) -> dict:
    """N threads, ``repeats`` requests each, started together."""
    def client() -> list:
        return [r.ask(video=str(clip), question=QUESTION, method=method, max_new_tokens=new_tokens, template="plain")
                for _ in range(repeats)]

    per_client, wall = at_once(client, n)
    results = [res for batch in per_client for res in batch]
    tokens = sum(len(res.token_ids) for res in results)
    ttft = [res.timings["ttft_s"] for res in results]
    return {
        "clients": n, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "per_request_decode_tokens_per_s": statistics.median(res.timings["decode_tokens_per_s"] for res in results),
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
        "queue_p50_s": statistics.median(res.timings["queue_s"] for res in results),
        "batch_mean": statistics.mean(res.timings["batch_mean"] for res in results),
        "identical_to_solo": all(res.token_ids == solo for res in results),
    }


def run_concurrency(args) -> dict:
    from runtime.bench.exports import bench_clip
    from runtime.reasoner import Reasoner

    backend = args.backend[0] if args.backend else "auto"
    r = Reasoner.load(args.engine, backend=backend, reuse_mb=0)
    clip = bench_clip(Path(args.work), args.seconds)
    levels = sorted(set(args.concurrency))
    rep = {"engine": str(args.engine), "backend": r.backend.name, "max_batch": r.max_batch,
           "new_tokens": args.new_tokens,
           "repeats": args.repeats, "levels": levels, "methods": {}}
    for method in ("base", "vreason"):
        solo = r.ask(video=str(clip), question=QUESTION, method=method, max_new_tokens=args.new_tokens,
                     template="plain").token_ids  # also the warm-up
        rows = []
        for n in levels:
            rows.append(run_level(r, clip, method, n, args.repeats, args.new_tokens, solo))
            print(f"measured {method} x{n}: {rows[-1]['aggregate_tokens_per_s']:.1f} tokens/s in all",
                  file=sys.stderr)
        one = rows[0]["aggregate_tokens_per_s"] if levels[0] == 1 else None
        for row in rows:
            row["aggregate_over_one_client"] = row["aggregate_tokens_per_s"] / one if one else None
        rep["methods"][method] = rows
    return rep


def concurrency_table(rep: dict) -> str:
    lines = [f"{rep['engine']} on {rep['backend']}: {rep['new_tokens']} new tokens, {rep['repeats']} requests per "
             f"client, clients started together; one engine thread, up to {rep['max_batch']} requests taking turns "
             "(no shared pass over the weights yet)", "",
             "| method | clients | aggregate tok/s | vs 1 client | per-request decode tok/s | TTFT p50 (s) | "
             "TTFT p95 (s) | queue p50 (s) | batch mean | answers = solo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, rows in rep["methods"].items():
        for row in rows:
            ratio = row["aggregate_over_one_client"]
            lines.append(f"| {method} | {row['clients']} | {row['aggregate_tokens_per_s']:.1f} | "
                         f"{'-' if ratio is None else f'x{ratio:.2f}'} | "
                         f"{row['per_request_decode_tokens_per_s']:.1f} | {row['ttft_p50_s']:.3f} | "
                         f"{row['ttft_p95_s']:.3f} | {row['queue_p50_s']:.3f} | {row['batch_mean']:.2f} | "
                         f"{'yes' if row['identical_to_solo'] else 'NO'} |")
    return "\n".join(lines)
