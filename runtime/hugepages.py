"""A CPU model's weights moved into 2 MB pages (Linux transparent huge pages) after loading.

A CPU decode step reads every weight once (about 2 GB a token on the bench fp32 export). In 4 KB pages that is half
a million pages a step, more than the TLB covers, and each miss walks page tables that the weights' own reads have
evicted from the caches. Where the kernel's THP mode is ``madvise`` (the default of many distributions), memory that
ONNX Runtime or PyTorch allocates stays in 4 KB pages unless asked. Measured on the bench fp32 export (2-core AMD
EPYC VM, docs/benchmarks.md, 2026-12-04): the 4-row decode step x1.01-x1.28 faster in 2 MB pages (median x1.09),
process against process; at int4 (a quarter of the bytes) within the noise.

So ``Reasoner.load`` on CPU (``hugepages=True``, the default) notes the process's anonymous memory before loading and,
after, asks the kernel to move what the load added into huge pages (``madvise(MADV_COLLAPSE)``, Linux 6.1 or later)
on a thread of its own at the lowest CPU priority: the model answers at once, and the move runs in the cores' idle
time (on that VM about 3.5 s a GB, mostly the hypervisor's page faults). Only 2 MB blocks whose pages are nearly all
resident are moved (``DENSE``), so resident memory grows by at most an eighth of what is moved (thread stacks and
sparse heaps are left as they are). The answers do not change: the same bytes in other pages.

Nothing happens off Linux, with THP ``never``, or on kernels without ``MADV_COLLAPSE`` (the state says which). It is
memory the process owns; another allocation that happened on another thread during the load may be moved too,
which changes only its pages.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import sys
import threading
import weakref
from pathlib import Path

PAGE = 4096
HUGE = 2 << 20
MADV_COLLAPSE = 25
DENSE = 7 / 8  # a 2 MB block is moved when at least this share of its 4 KB pages is resident
STEP = 16  # blocks per madvise call (32 MB): the thread checks for a stop between calls
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_MOVES: weakref.WeakSet = weakref.WeakSet()


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), None where there is none."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def anonymous() -> list[tuple[int, int]]:
    """The process's private writable anonymous mappings (heap included), as sorted, merged address ranges."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if parts[1] != "rw-p" or parts[4] != "0" or (len(parts) > 5 and parts[5] != "[heap]"):
                    continue
                a, b = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((a, b))
    except OSError:
        return []
    return merged(ranges)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def added(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole 2 MB blocks of ``after``'s ranges that lie outside every range of ``before`` (an existing mapping
    the load grew, or that a new one merged with, contributes only its new part)."""
    out = []
    for a, b in after:
        pieces = [(a, b)]
        for c, d in before:
            if d <= a or c >= b:
                continue
            pieces = [p for x, y in pieces for p in ((x, min(y, c)), (max(x, d), y)) if p[1] > p[0]]
        for x, y in pieces:
            x, y = -(-x // HUGE) * HUGE, y // HUGE * HUGE
            if y > x:
                out.append((x, y))
    return out


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def dense_blocks(libc, start: int, end: int) -> list[int]:
    """The 2 MB blocks of [start, end) with at least ``DENSE`` of their pages resident (their addresses)."""
    vec = ctypes.create_string_buffer((end - start) // PAGE)
    if libc.mincore(start, end - start, vec) != 0:
        return []  # (unmapped since: nothing to move)
    raw, per = vec.raw, HUGE // PAGE  # (a byte a page: 1 resident, 0 not)
    most = per - int(per * DENSE)  # pages a block may lack
    return [start + i * PAGE for i in range(0, len(raw), per) if raw.count(0, i, i + per) <= most]


class Move:
    """The move of a load's memory into huge pages, on a background thread (``start``). ``state``: ``moving``,
    ``done``, ``stopped``, or why nothing is moved; ``moved`` / ``blocks``: bytes moved so far, and in all."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.state = "waiting"
        self.moved = 0
        self.failed = 0
        self.blocks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Move:
        self.state = "moving"
        self._thread = threading.Thread(target=self._run, name="hugepages", daemon=True)
        _MOVES.add(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        try:
            libc = _libc()
            blocks = [b for a, z in self.ranges for b in dense_blocks(libc, a, z)]
            self.blocks = len(blocks) * HUGE
            errors = set()
            i = 0
            while i < len(blocks):
                if self._stop.is_set():
                    self.state = "stopped"
                    return
                j = i + 1  # a run of adjacent blocks, at most STEP, in one call
                while j < len(blocks) and j - i < STEP and blocks[j] == blocks[j - 1] + HUGE:
                    j += 1
                n = (j - i) * HUGE
                if libc.madvise(blocks[i], n, MADV_COLLAPSE) == 0:
                    self.moved += n
                else:
                    self.failed += n
                    errors.add(ctypes.get_errno())
                i = j
            if blocks and not self.moved and errors == {errno.EINVAL}:  # EINVAL everywhere: no MADV_COLLAPSE here
                self.state = "unsupported: this kernel cannot collapse pages on request (Linux 6.1 or later can)"
            else:
                self.state = "done"
        except Exception as e:  # noqa: BLE001 (an optimisation: the model runs as it is)
            self.state = f"failed: {e}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the move to end; whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop after the call under way (at most ``STEP`` blocks)."""
        self._stop.set()
        self.wait(timeout)

    def as_dict(self) -> dict:
        return {"state": self.state, "moved_mb": round(self.moved / 2**20), "dense_mb": round(self.blocks / 2**20),
                "failed_mb": round(self.failed / 2**20)}


def unavailable() -> str | None:
    """Why huge pages cannot be asked for here (None: they can)."""
    if not sys.platform.startswith("linux") or not Path("/proc/self/maps").is_file():
        return "not Linux"
    mode = thp_mode()
    if mode is None:
        return "this kernel has no transparent huge pages"
    if mode == "never":
        return "transparent huge pages are off on this machine (never)"
    return None


def after_load(before: list[tuple[int, int]]) -> Move:
    """The memory added since ``before`` (``anonymous()`` taken before the load), its move started."""
    why = unavailable()
    if why is not None:
        move = Move([])
        move.state = f"off: {why}"
        return move
    return Move(added(before, anonymous())).start()


def stop_all() -> None:
    """Every move stopped (at the interpreter's exit: each ends within one madvise call)."""
    for move in list(_MOVES):
        move.stop(2.0)


atexit.register(stop_all)
