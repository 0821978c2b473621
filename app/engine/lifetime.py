"""A child process that must not outlive its parent: the kernel signals it when the parent dies, even by SIGKILL.

Torch-free, so the native stack's supervisor (``app.ops.stack``) uses it for its children as DDP ranks do."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; True if it could (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig) == 0
    return False
