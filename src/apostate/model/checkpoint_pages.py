"""Give back the memory of checkpoint pages a loaded model no longer reads.

transformers maps each safetensors shard and hands out tensors that are views into the
maps; every page read while loading stays resident, and counts in the process's memory,
for as long as any view into that shard lives (one small norm weight suffices). After a
4-bit load the quantized weights are new tensors, and after column-major conversion the
Linear weights are too, yet their source pages stay resident: 2 GB on the demo model.

`madvise(MADV_DONTNEED)` drops a range of a mapping from this process: the pages of a
read-only file mapping are reloaded from the file (or the page cache) if anything still
reads them, so live views stay valid. It is used at load time only, on file-backed
`.safetensors` mappings, before anything could have written into them. Linux only;
elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
from contextlib import contextmanager

MADV_DONTNEED = 4


def checkpoint_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's mappings of .safetensors files."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().endswith(".safetensors"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_pages(start: int, end: int, mappings: list[tuple[int, int]]) -> None:
    """Drop the whole pages of [start, end) from this process where they lie in a checkpoint mapping."""
    for map_start, map_end in mappings:
        low, high = max(start, map_start), min(end, map_end)
        low = -(-low // mmap.PAGESIZE) * mmap.PAGESIZE  # only pages wholly inside the range
        high = high // mmap.PAGESIZE * mmap.PAGESIZE
        if high > low:
            _libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED)


def release_checkpoint_pages() -> None:
    """Drop every checkpoint page from this process; those still read come back on use."""
    mappings = checkpoint_mappings()
    for start, end in mappings:
        drop_pages(start, end, mappings)


@contextmanager
def releasing_checkpoint_pages(converting: bool, interval: float = 0.2):
    """Give checkpoint pages back after the block (a load), and every `interval` seconds
    during it when the load converts the weights.

    Quantizing, or casting to another dtype, reads every page of the checkpoint once and
    keeps none: dropping them as it goes keeps the load's peak near the loaded model's size
    instead of model plus checkpoint (bfloat16 from a float32 checkpoint: 3.96 GiB without,
    2.41 GiB with, on the demo). A load in the checkpoint's own dtype keeps views into the
    mapped pages as its weights, so dropping them during the load saves nothing and only
    makes whatever reads them next fault them in again (issue 14: `bench/load_stall.py`).
    """
    done = threading.Event()

    def release_until_done():
        while not done.wait(interval):
            release_checkpoint_pages()

    thread = threading.Thread(target=release_until_done, name="release-checkpoint-pages", daemon=True)
    if converting:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if converting:
            thread.join()
        release_checkpoint_pages()


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
