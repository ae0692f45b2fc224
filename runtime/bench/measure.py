"""Measurement helpers shared by the benchmarks: read bandwidth, peak resident memory, medians and ratios, and
the report file (``--save``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from models.checks import process_memory


def read_bandwidth(bytes_: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading a large fp32 tensor (torch's own threads), median of ``repeats``."""
    x = torch.ones(bytes_ // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return bytes_ / statistics.median(times)


# Peak resident memory by hand (/proc): psutil reports the current RSS portably, but neither a peak that can be
# reset between measurements (VmHWM with clear_refs) nor one at all on Linux, which is what the bench needs.


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the VmHWM high-water mark
    except OSError:
        pass


def peak_rss() -> int:
    return process_memory("VmHWM")


def resident_bytes(device) -> int:
    """Memory held now: PyTorch's allocated bytes on CUDA; on CPU the process's resident set after collecting
    garbage and handing freed heap back to the system (glibc's ``malloc_trim``, where there is one)."""
    import gc

    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return process_memory()


def median_of(runs: list[dict], key: str) -> float:
    vals = [x[key] for x in runs if x[key] is not None]
    return statistics.median(vals) if vals else float("nan")


def ratio(a: list[dict], b: list[dict], key: str) -> float:
    return median_of(a, key) / median_of(b, key)


def sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def write_report(path, report: dict) -> None:
    """``report`` as JSON at ``path``, replaced whole (a reader never sees half a file)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(report, indent=2) + "\n")
    part.replace(path)


def load(engine, hugepages: bool = True, **kwargs):
    """``Reasoner.load(engine, **kwargs)`` for a measurement: with ``hugepages``, the move of its weights into 2 MB
    pages (``runtime.hugepages``) is waited for first, so that no measured request runs beside it or before it."""
    from runtime.reasoner import Reasoner

    r = Reasoner.load(engine, hugepages=hugepages, **kwargs)
    move = r.hugepages
    if move is not None:
        t = time.perf_counter()
        move.wait()
        state = move.as_dict()
        print(f"the weights' move into 2 MB pages: {state['state']}, {state['moved_mb']} MiB moved "
              f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return r
