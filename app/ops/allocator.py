"""Training processes run with jemalloc (``ALLOCATOR``, the default): restart this process with it preloaded.

Why: fine-tuning on the CPU frees and allocates large activation buffers of a new size almost every step
(length-grouped batches have ~200 widths). glibc either returns such blocks to the kernel on free, so every step
faults its buffers in again (slow), or, told to keep them (``engine.memory.keep_freed_memory_in_heap``), leaves
holes the next sizes do not fit, and its heap grows all run long. jemalloc's size classes reuse freed extents
across nearby sizes; with purging off and large blocks in its ordinary arenas (``JEMALLOC_CONF``), a run stays
near its working set at the speed of glibc's reuse (bench/README.md, "Memory").
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys

from app.config import Settings, environment_with, preloaded_libraries
from app.engine.memory import allocator_in_use

log = logging.getLogger(__name__)

# Keep freed pages (no decay: the next steps reuse them) and serve large blocks from the ordinary arenas (jemalloc
# would otherwise put blocks over 8 MiB in an arena of their own that returns them to the kernel at once).
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def restart_with_allocator(settings: Settings) -> None:
    """Replace this process by the same command with jemalloc preloaded, if ALLOCATOR asks for it and it is not
    serving yet. Returns (and glibc stays) when it serves already, is not wanted, is not installed, or was
    preloaded and did not take. Call it before the process starts threads or opens anything it must keep."""
    if settings.allocator != "jemalloc" or allocator_in_use() == "jemalloc":
        return
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        log.warning("ALLOCATOR=jemalloc, but libjemalloc2 is not installed: glibc's allocator, whose memory grows "
                    "over a run (sudo apt-get install libjemalloc2, or ALLOCATOR=glibc to silence this)")  # fmt: skip
        return
    if library in preloaded_libraries():  # asked for already: the dynamic loader refused it
        log.warning("%s is in LD_PRELOAD but not loaded: glibc's allocator", library)
        return
    env = environment_with(LD_PRELOAD=" ".join([library, *preloaded_libraries()]), MALLOC_CONF=JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
