"""This process's memory: which allocator serves it, glibc's heap settings, resident and peak memory.

Torch-free, so the CLI can ask which allocator it runs with before it imports torch (``app.ops.allocator``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
from pathlib import Path


@functools.cache  # the allocator cannot change within a process
def allocator_in_use() -> str:
    """``jemalloc`` when it serves this process's malloc (preloaded: ``app.ops.allocator``), else ``glibc``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 1 << 30
# What ``heap_limit_for`` lets a training step hold above the model, its gradients and AdamW state: its activations
# and the freed blocks kept for the next steps.
HEAP_SLACK_BYTES = 3 << 29  # 1.5 GiB


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory_in_heap() -> bool:
    """Where glibc serves malloc (ALLOCATOR=glibc, or no jemalloc), keep freed activation buffers for reuse instead
    of unmapping them; True if applied.

    By default every block over the (at most 32 MiB) mmap threshold is mmap'd and returned to the kernel on free,
    so each training step faults in, and the kernel zeroes, its large activations again. Blocks up to 1 GiB now
    come from the heap and stay there (faster CPU steps), but the heap then grows all run long: jemalloc, the
    default, is as fast and stays near the working set. Process-wide, so the process that exists to train calls
    it (CLI train, the worker's job), not a library function.
    """
    libc = glibc()
    if libc is None or allocator_in_use() != "glibc":
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))


def trim_heap_above(limit_bytes: int) -> bool:
    """Return freed pages to the kernel if resident memory exceeds ``limit_bytes``; True if it did: jemalloc purges
    every arena, glibc trims its heap (``malloc_trim``).

    Freed blocks stay resident for reuse (jemalloc: no purging; glibc: heap reuse), and batches of ever new widths
    leave some that later blocks do not fit, so memory creeps up over a run. Releasing past a limit bounds that;
    the next step faults its buffers in again (bench/step_ablation.py's ``with heap_trim`` variants)."""
    if resident_bytes() <= limit_bytes:
        return False
    if allocator_in_use() == "jemalloc":
        purge = getattr(ctypes.CDLL(None), "mallctl", None)
        return purge is not None and purge(b"arena.4096.purge", None, None, None, 0) == 0  # 4096: every arena
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def heap_limit_for(model) -> int:
    """A limit for ``trim_heap_above`` in a training process: what it holds now, plus the model's gradients and AdamW
    state still to come (3 × its weights), plus ``HEAP_SLACK_BYTES``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return resident_bytes() + 3 * weights + HEAP_SLACK_BYTES


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_resident_mb() -> float:
    """This process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
