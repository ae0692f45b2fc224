"""``python -m runtime.bench.serve --engine DIR``: the HTTP service against the Python API, side by side.

One process loads the export once and serves it on 127.0.0.1 (``runtime.serve.app`` under uvicorn). Each round
asks the same streamed question about the benchmark clip through the API (``Reasoner.stream``) and through the
server (httpx, Server-Sent Events; one client per calling thread, kept across requests so its connection is
reused, as an app's would be), which goes first alternating. Both are timed the same way, from the
caller's side: TTFT from the call to the first token (a token event; a chunk), decode rate over the tokens after
it; and the part of the TTFT spent outside the runtime (the caller's TTFT minus the runtime's own, which starts at
the request's ``stream()`` call: for the server, HTTP, parsing, hand-offs and delivery). Then
``--clients`` streamed requests at once through the server against as many through the API from threads
(aggregate tokens per second). Reported: medians, the server's TTFT minus the API's (ms) and its decode rate
over the API's, per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from models import checks
from models.errors import run_cli

QUESTION = "Which direction does the red circle move?"


def _api(r, clip: str, new_tokens: int) -> tuple[float, float, int, float]:
    t0 = time.perf_counter()
    first = last = None
    s = r.stream(video=clip, question=QUESTION, max_new_tokens=new_tokens, template="plain", events=True)
    for _ in s:
        last = time.perf_counter()
        first = first or last
    n = len(s.result.token_ids)
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n, s.result.timings["ttft_s"]


_clients = threading.local()


def _server(url: str, clip: str, new_tokens: int) -> tuple[float, float, int, float]:
    import httpx

    http = getattr(_clients, "http", None)
    if http is None:  # one client per calling thread, kept: its connection is reused, as an app's would be
        http = _clients.http = httpx.Client(timeout=600)
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}},
                                                      {"type": "text", "text": QUESTION}]}],
            "max_tokens": new_tokens, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n, runtime_ttft = 0, 0.0
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
                runtime_ttft = chunk["vreason"]["timings"]["ttft_s"]
            elif "token_id" in chunk.get("vreason", {}):  # one chunk per token
                last = time.perf_counter()
                first = first or last
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n, runtime_ttft


def _together(fn, clients: int) -> float:
    """Aggregate tokens per second of ``clients`` requests at once."""
    from runtime.bench.concurrency import at_once

    results, wall = at_once(fn, clients)
    return sum(r[2] for r in results) / wall


def serve_in_thread(asgi) -> tuple[str, object]:
    """(url, server) of uvicorn serving ``asgi`` on a free port of 127.0.0.1, on a thread of this process."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def run(args) -> dict:
    from runtime.bench.exports import bench_clip
    from runtime.reasoner import Reasoner
    from runtime.serve import app

    r = Reasoner.load(args.engine, backend=args.backend, reuse_mb=0)
    clip = bench_clip(Path(args.work), args.seconds)
    url, server = serve_in_thread(app(reasoner=r, media_root=clip.parent))
    try:
        api = lambda: _api(r, str(clip), args.new_tokens)  # noqa: E731
        http = lambda: _server(url, clip.name, args.new_tokens)  # noqa: E731
        api(), http()  # warm-up
        rows = []
        for i in range(args.rounds):
            pair = {}
            for name, fn in ((("api", api), ("server", http)) if i % 2 == 0 else (("server", http), ("api", api))):
                pair[name] = fn()
            rows.append(pair)
            print(f"round {i + 1}: TTFT api {pair['api'][0]:.3f} s, server {pair['server'][0]:.3f} s; decode api "
                  f"{pair['api'][1]:.1f}, server {pair['server'][1]:.1f} tok/s", file=sys.stderr)
        together = {"api": _together(api, args.clients), "server": _together(http, args.clients)}
    finally:
        server.should_exit = True
    ttft_gap = [1e3 * (p["server"][0] - p["api"][0]) for p in rows]
    # what the caller waits beyond the runtime's own TTFT (from the request's stream() call to its first token):
    # HTTP, parsing, the hand-offs and delivery for the server; next to nothing for the API. Unlike the gap above,
    # it does not carry the model's run-to-run noise.
    overhead = {k: [1e3 * (p[k][0] - p[k][3]) for p in rows] for k in ("api", "server")}
    decode_ratio = [p["server"][1] / p["api"][1] for p in rows if p["api"][1] > 0]
    return {
        "engine": str(args.engine), "backend": r.backend.name, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "ttft_api_s": statistics.median(p["api"][0] for p in rows),
        "ttft_server_s": statistics.median(p["server"][0] for p in rows),
        "ttft_server_minus_api_ms": statistics.median(ttft_gap), "ttft_gap_range_ms": [min(ttft_gap), max(ttft_gap)],
        "ttft_outside_runtime_api_ms": statistics.median(overhead["api"]),
        "ttft_outside_runtime_server_ms": statistics.median(overhead["server"]),
        "ttft_outside_runtime_server_range_ms": [min(overhead["server"]), max(overhead["server"])],
        "decode_api_tokens_per_s": statistics.median(p["api"][1] for p in rows),
        "decode_server_tokens_per_s": statistics.median(p["server"][1] for p in rows),
        "decode_server_over_api": statistics.median(decode_ratio),
        "decode_ratio_range": [min(decode_ratio), max(decode_ratio)],
        "clients": args.clients, "aggregate_api_tokens_per_s": together["api"],
        "aggregate_server_tokens_per_s": together["server"],
        "aggregate_server_over_api": together["server"] / together["api"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.serve", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory")
    ap.add_argument("--backend", choices=("auto", "trt", "ort", "torch"), default="auto")
    ap.add_argument("--rounds", type=int, default=8, help="alternated rounds of one request each way")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--clients", type=int, default=4, help="streamed requests at once, each way, at the end")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of the benchmark clip")
    ap.add_argument("--work", default="work/bench", help="where the benchmark clip is written")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")

    def go(args) -> int:
        checks.input_dir(args.engine, "--engine")
        checks.check_number("--rounds", args.rounds, lo=1, integer=True)
        checks.check_number("--new-tokens", args.new_tokens, lo=2, integer=True)
        checks.check_number("--clients", args.clients, lo=1, hi=64, integer=True)
        rep = run(args)
        if args.json:
            print(json.dumps(rep, indent=2))
        else:
            print(f"server against the API ({rep['backend']}, {rep['rounds']} alternated rounds, "
                  f"{rep['new_tokens']} tokens): TTFT {1e3 * rep['ttft_api_s']:.1f} -> "
                  f"{1e3 * rep['ttft_server_s']:.1f} ms (median gap {rep['ttft_server_minus_api_ms']:+.1f} ms; outside "
                  f"the runtime {rep['ttft_outside_runtime_api_ms']:.1f} -> "
                  f"{rep['ttft_outside_runtime_server_ms']:.1f} ms), decode "
                  f"x{rep['decode_server_over_api']:.3f}; {rep['clients']} clients at once: "
                  f"x{rep['aggregate_server_over_api']:.3f} aggregate")
        return 0

    return run_cli(go, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
