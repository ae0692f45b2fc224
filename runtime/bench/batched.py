"""python -m runtime.bench --synthetic NAME --concurrency 1 8: decode steps of N requests together at a real
model's shape, random weights, on the torch backend's batched calls.

Each level N gets a KV pool of N rows (``runtime.pool.KVPool``), each row a request whose cache holds the prompt
(``--prompt-tokens`` entries of random keys and values: the step reads them as it reads a real prompt's), and
decodes ``--new-tokens`` tokens for all N at once, greedy: per step the trunk for every row in one call
(``TorchBackend.trunk_rows``), the head for every row in one call (``head_rows``), each row's token read back to the
host (one sync per step, as the engine's loop reads it). Two paths side by side: ``static`` (fixed shapes over the
pool's whole buffers, its rows a power of two; on CUDA each call replayed as a CUDA graph: ``RowGraphs``, what
``Reasoner.load(decode="static", max_batch=N)`` runs) and ``dynamic`` (the calls over the rows' filled length,
eager). The levels alternate within each repeat; reported per path and N: the aggregate decode rate (N x steps
over the steps' wall time, after ``--warmup`` unmeasured steps: the captures), the rate per request, and the
aggregate over N = 1's. Speed only (random weights), base decode only (V-Reason's updates run eagerly between the
replays; the per-request bench measures them: ``--engine DIR --concurrency``).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def run_batched(args) -> dict:
    from models.checkpoint import resolve_dtype
    from runtime.backends.torch_ref import TorchBackend
    from runtime.bench.synthetic import _device_name, _sync, load_config, random_decoder

    cfg, _ = load_config(args.synthetic)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    levels = list(dict.fromkeys(args.concurrency))
    model = random_decoder(cfg, dtype, device)
    paths = {}
    for path in ("static", "dynamic"):
        backend = TorchBackend(model, dtype, str(device))
        backend.attach_head(model.head)
        if path == "static":
            backend.static_rows(cuda_graphs=device.type == "cuda")
        paths[path] = backend
    steps = args.new_tokens
    warm = max(args.warmup, 2)  # a static level's first calls run eagerly, then are captured
    rates: dict[str, dict[int, list[float]]] = {p: {n: [] for n in levels} for p in paths}
    for _ in range(args.repeats):
        for n in levels:
            for path, backend in paths.items():
                rates[path][n].append(_level(backend, cfg, dtype, device, n, args.prompt_tokens, steps, warm,
                                             static=path == "static"))
                print(f"measured {path} x{n}", file=sys.stderr)
                _sync(device)
    agg = {p: {n: statistics.median(v) for n, v in per.items()} for p, per in rates.items()}
    one = levels[0]
    return {
        "synthetic": args.synthetic, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "prompt_tokens": args.prompt_tokens, "new_tokens": steps,
        "repeats": args.repeats, "levels": levels,
        "cuda_graphs": device.type == "cuda",
        "aggregate_decode_tokens_per_s": {p: {str(n): v for n, v in a.items()} for p, a in agg.items()},
        "per_request_decode_tokens_per_s": {p: {str(n): v / n for n, v in a.items()} for p, a in agg.items()},
        "aggregate_over_first_level": {p: {str(n): v / a[one] for n, v in a.items()} for p, a in agg.items()},
        "runs": {p: {str(n): v for n, v in per.items()} for p, per in rates.items()},
    }


@torch.no_grad()
def _level(backend, cfg, dtype, device, n: int, prompt: int, steps: int, warm: int, static: bool) -> float:
    """N requests decoding together for ``warm`` + ``steps`` steps: the measured steps' aggregate tokens/s."""
    from runtime.bench.synthetic import _sync
    from runtime.pool import KVPool

    t = cfg.text
    pool = KVPool(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, dtype, device, row_buckets=static)
    caches = [pool.acquire(prompt + warm + steps) for _ in range(n)]
    g = torch.Generator(device=device).manual_seed(n)
    for buf in (*pool.keys, *pool.values):  # the prompts' entries (random, of a real cache's scale)
        buf.normal_(0.0, 1.0, generator=g)
    for c in caches:
        c.length = prompt
    head = backend.head
    tokens = torch.randint(0, min(t.vocab_size, 150000), (n,), generator=g, device=device)
    pos = torch.full((3, 1, 1), prompt, dtype=torch.long, device=device)
    t0 = 0.0
    for k in range(warm + steps):
        if k == warm:
            _sync(device)
            t0 = time.perf_counter()
        emb = head.embed(tokens.view(n, 1))
        p = pos + k
        hidden = backend.trunk_rows([(emb[i:i + 1], p, c) for i, c in enumerate(caches)])
        logits = backend.head_rows([(h, p, c) for h, c in zip(hidden, caches)])
        tokens = torch.stack([x.argmax(-1) for x in logits])
        tokens.tolist()  # the host reads the step's tokens, as the engine's loop does
        for c in caches:
            c.length += 1
    _sync(device)
    rate = n * steps / (time.perf_counter() - t0)
    for c in caches:
        c.release()
    return rate


def batched_table(rep: dict) -> str:
    lines = [f"synthetic {rep['synthetic']} ({rep['dtype']}, random weights) on {rep['device']}, torch {rep['torch']}: "
             f"{rep['prompt_tokens']} cached tokens per request, {rep['new_tokens']} steps measured, median of "
             f"{rep['repeats']}; requests decoded together (torch backend's batched calls"
             f"{', static ones replayed as CUDA graphs' if rep['cuda_graphs'] else ''})", "",
             "| path | requests | aggregate decode tok/s | per request | aggregate vs first level |",
             "|---|---|---|---|---|"]
    for p, agg in rep["aggregate_decode_tokens_per_s"].items():
        for n, v in agg.items():
            lines.append(f"| {p} | {n} | {v:.1f} | {rep['per_request_decode_tokens_per_s'][p][n]:.1f} | "
                         f"x{rep['aggregate_over_first_level'][p][n]:.2f} |")
    return "\n".join(lines)
