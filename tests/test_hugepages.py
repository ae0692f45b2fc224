"""The loaded weights moved into 2 MB pages (runtime.hugepages): which memory is moved, that it is, and that answers
do not change."""

from __future__ import annotations

import mmap

import pytest

from runtime import hugepages
from runtime.hugepages import HUGE, PAGE, Move, added

MB = 2**20


def test_added_keeps_the_whole_blocks_outside_what_was_there():
    assert added([], [(0, 10 * MB)]) == [(0, 10 * MB)]
    # a mapping the load grew, or a new one merged with an old one: only the new part, in whole 2 MB blocks
    assert added([(0, 5 * MB)], [(0, 20 * MB)]) == [(6 * MB, 20 * MB)]
    assert added([(8 * MB, 12 * MB)], [(0, 20 * MB)]) == [(0, 8 * MB), (12 * MB, 20 * MB)]
    assert added([(0, 20 * MB)], [(0, 20 * MB)]) == []
    assert added([], [(MB, 4 * MB + PAGE)]) == [(2 * MB, 4 * MB)]
    assert added([], [(MB, 3 * MB)]) == []  # no whole block


def _region(size: int):
    """An anonymous mapping with a 2 MB-aligned range of ``size`` inside it: (mapping, start address)."""
    import ctypes

    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -(-base // HUGE) * HUGE
    return m, start, start - base


def _resident_pages(start: int, size: int) -> int:
    import ctypes

    vec = ctypes.create_string_buffer(size // PAGE)
    assert hugepages._libc().mincore(start, size, vec) == 0
    return sum(b & 1 for b in vec.raw)


def _huge_kb(start: int) -> int:
    """AnonHugePages of the mapping holding ``start`` (adjacent mappings may have been merged into it)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if "-" in line.split()[0] and not line[0].isupper():
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a <= start < b:
                for rest in lines[i + 1:]:
                    if rest.startswith("AnonHugePages:"):
                        return int(rest.split()[1])
    return 0


@pytest.mark.skipif(hugepages.unavailable() is not None, reason=f"huge pages: {hugepages.unavailable()}")
def test_dense_memory_is_moved_and_sparse_memory_is_left():
    size = 16 * MB
    dense, dstart, doff = _region(size)
    sparse, sstart, soff = _region(size)
    dense[doff:doff + size] = b"\x01" * size  # every page written
    for i in range(soff, soff + size, HUGE):  # one page in each block
        sparse[i] = 1
    move = Move([(dstart, dstart + size), (sstart, sstart + size)]).start()
    assert move.wait(60)
    if move.state.startswith("unsupported"):
        pytest.skip(move.state)
    assert move.state == "done", move.state
    assert move.blocks == size and move.moved == size  # the sparse blocks were not counted, nor moved
    assert _huge_kb(dstart) >= size // 1024
    assert _resident_pages(sstart, size) == size // HUGE  # still one page a block: nothing filled in
    assert dense[doff:doff + size] == b"\x01" * size  # the same bytes
    dense.close()
    sparse.close()


@pytest.mark.skipif(hugepages.unavailable() is not None, reason=f"huge pages: {hugepages.unavailable()}")
def test_a_stopped_move_ends_and_says_so():
    size = 8 * MB
    dense, start, off = _region(size)
    dense[off:off + size] = b"\x01" * size
    move = Move([(start, start + size)])
    move.stop()  # before it starts: it ends at its first check, having moved nothing
    move.start()
    assert move.wait(10)
    assert move.state == "stopped" and move.as_dict()["moved_mb"] == 0
    dense.close()


def test_a_cpu_load_moves_its_weights_and_answers_as_without(engine_dir):
    from models.samples import render_frames
    from runtime.reasoner import Reasoner

    frames = [f[:, :, ::-1].copy() for f in render_frames("circle", "red", "right", frames=4, size=(64, 64))]
    ask = dict(frames=frames, fps=2.0, question="What moves?", max_new_tokens=6)
    with Reasoner.load(engine_dir, backend="ort", reuse_mb=0) as r:
        assert r.hugepages is not None
        moved = r.ask(**ask)
        assert r.hugepages.wait(60)
        state = r.hugepages.as_dict()["state"]
        assert state in ("done",) or state.startswith(("off:", "unsupported")), state
        after = r.ask(**ask)
    with Reasoner.load(engine_dir, backend="ort", reuse_mb=0, hugepages=False) as plain:
        assert plain.hugepages is None
        base = plain.ask(**ask)
    assert moved.token_ids == after.token_ids == base.token_ids
    assert moved.entropy == base.entropy


def test_hugepages_takes_a_bool(engine_dir):
    from models.errors import InputError
    from runtime.reasoner import Reasoner

    with pytest.raises(InputError, match="hugepages must be True or False"):
        Reasoner.load(engine_dir, hugepages="yes")
