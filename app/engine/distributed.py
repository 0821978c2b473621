"""Training one model on several processes: PyTorch DDP, started by torchrun (``torch.distributed.run``).

``devices`` N > 1 runs N copies of the pipeline, one per rank. Each optimisation step every rank draws the
same global batch (same seeded generator), takes its contiguous share of it, and DDP averages the gradients,
so the step equals one process's step on the whole batch. Rank 0 alone writes the run folder, tracks and
reports progress. On one device nothing here does anything: no process group, no wrapper, no launch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from app.config import Settings, environment_with
from app.engine.lifetime import die_with_parent
from app.engine.modeling import resolve_device

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Whether this process is one of the ranks torchrun started (it sets TORCHELASTIC_RUN_ID, RANK, ...)."""
    return dist.is_torchelastic_launched()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank_zero() -> bool:
    return rank() == 0


class DevicesNotAvailable(ValueError):
    """More devices were asked for than this machine can give."""


class RanksFailed(RuntimeError):
    """A rank of a multi-device run failed (torchrun exited non-zero); its error is in the log."""


def check_devices(devices: int, device_name: str) -> None:
    """DevicesNotAvailable unless this machine can give ``devices`` ranks (its GPUs on CUDA, else its CPU cores)."""
    available, what = available_devices(device_name)
    if devices > available:
        raise DevicesNotAvailable(f"{devices} devices asked, this machine has {available} {what}")


def available_devices(device_name: str) -> tuple[int, str]:
    """How many ranks this machine can give, and of what: its GPUs where training runs on CUDA, else its cores."""
    if resolve_device(device_name).type == "cuda":
        return torch.cuda.device_count(), "CUDA GPUs"
    return cpu_cores(), "CPU cores"


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def threads_per_rank(devices: int, num_threads: int = 0) -> int:
    """``NUM_THREADS`` when set, else the cores divided among the ranks, so N ranks do not fight over them."""
    return num_threads if num_threads > 0 else max(1, cpu_cores() // devices)


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[torch.device]:
    """Join torchrun's process group for the block (gloo on the CPU, NCCL on GPUs); yields this rank's device.

    On GPUs rank r of a node takes GPU ``LOCAL_RANK``. The group is left on the way out, also on error."""
    die_with_torchrun()
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.get_node_local_rank())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def die_with_torchrun() -> None:
    """Have the kernel kill this rank when torchrun dies, even by SIGKILL (a cancelled job's process group).

    torchrun puts each rank in a session of its own, so killing torchrun's group would otherwise leave
    the ranks training as orphans. Linux only; elsewhere a no-op."""
    if die_with_parent(signal.SIGKILL) and os.getppid() == 1:  # torchrun died before prctl took effect
        os._exit(1)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model DDP-wrapped for the training steps when there are several ranks; the model itself otherwise."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, **buffer_sync_off(DistributedDataParallel)
    )


@functools.cache
def buffer_sync_off(ddp: type) -> dict[str, bool]:
    """The keyword that stops ``ddp`` broadcasting buffers before every forward, in the spelling it accepts.

    Buffers (BERT's position and token type ids) are constants every rank builds alike. torch 2.13 spells it
    ``forward_sync_buffers`` and deprecates ``broadcast_buffers``; older torch (2.11, the GPU image's) has only
    ``broadcast_buffers``, whose False also skips the broadcast at start, which constants do not need."""
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def share_of_batch(indices: list[int]) -> tuple[list[int], float]:
    """This rank's contiguous slice of the global batch, and the weight of its loss.

    DDP averages the ranks' gradients; weighting each rank's mean loss by (its rows × ranks / batch rows)
    makes that average the whole batch's mean gradient even when the slices differ in size. A rank whose
    slice is empty (a last batch smaller than the ranks) computes one row with weight 0, because every
    rank must join each step's gradient exchange."""
    ranks = world_size()
    if ranks == 1:
        return indices, 1.0
    start, end = (len(indices) * r // ranks for r in (rank(), rank() + 1))
    if start == end:
        return indices[:1], 0.0
    return indices[start:end], (end - start) * ranks / len(indices)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself on one device); every rank must call it."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def computed_on_rank_zero(compute: Callable[[], float]) -> float:
    """``compute()`` run by rank 0 alone and sent to every rank (each must call this); on one device, run here.

    Dev accuracy goes this way: the ranks then take the same keep-best and early-stopping decisions even if
    their hardware rounded differently, and the other ranks wait instead of repeating the evaluation."""
    if world_size() == 1:
        return compute()
    carrier = [compute() if is_rank_zero() else None]
    dist.broadcast_object_list(carrier, src=0)
    return carrier[0]


def torchrun_command(devices: int, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` starting ``devices`` ranks of ``python -m <module_args>`` here."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(devices),
        "-m",
        *module_args,
    ]


def launch_ranks(devices: int, module_args: list[str], settings: Settings) -> int:
    """Run ``devices`` ranks of ``python -m <module_args>`` through torchrun and wait; its exit code (non-zero when
    any rank failed). The one launch of the CLI's ``--devices`` and a worker's multi-device job.

    DevicesNotAvailable first when this machine cannot give that many (``check_devices``). Each rank gets its share
    of the cores as OMP_NUM_THREADS (``threads_per_rank``), which also quiets torchrun's warning. torchrun stays in
    this process's group, so killing the group stops it, and the ranks with it."""
    check_devices(devices, settings.device)
    env = environment_with(OMP_NUM_THREADS=str(threads_per_rank(devices, settings.num_threads)))
    return subprocess.run(torchrun_command(devices, module_args), env=env, check=False).returncode
