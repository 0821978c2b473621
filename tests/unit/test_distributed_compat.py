"""The DDP wrapper passes only keywords the installed torch accepts, and those of the GPU image's torch (2.11)."""

import inspect

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from app.engine import distributed


class DistributedDataParallelOf211:
    """torch 2.11.0's ``DistributedDataParallel.__init__`` parameters (from its wheel), recording what it is given."""

    def __init__(
        self,
        module,
        device_ids=None,
        output_device=None,
        dim=0,
        broadcast_buffers=True,
        init_sync=True,
        process_group=None,
        bucket_cap_mb=None,
        find_unused_parameters=False,
        check_reduction=False,
        gradient_as_bucket_view=False,
        static_graph=False,
        delay_all_reduce_named_params=None,
        param_to_hook_all_reduce=None,
        mixed_precision=None,
        device_mesh=None,
        skip_all_reduce_unused_params=False,
        bucket_cap_mb_list=None,
    ):
        self.module, self.broadcast_buffers = module, broadcast_buffers


def test_the_buffer_keyword_is_one_the_installed_ddp_accepts():
    keywords = distributed.buffer_sync_off(DistributedDataParallel)
    inspect.signature(DistributedDataParallel).bind(torch.nn.Linear(2, 2), device_ids=None, **keywords)
    assert list(keywords.values()) == [False]
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        assert keywords == {"forward_sync_buffers": False}  # not the deprecated spelling, which warns


def test_wrapping_on_torch_2_11_turns_buffer_sync_off_with_broadcast_buffers(monkeypatch):
    monkeypatch.setattr(distributed, "DistributedDataParallel", DistributedDataParallelOf211)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    model = torch.nn.Linear(2, 2)
    wrapped = distributed.wrap(model)  # TypeError on a keyword 2.11 lacks
    assert wrapped.module is model and wrapped.broadcast_buffers is False


@pytest.mark.parametrize("ddp", [DistributedDataParallel, DistributedDataParallelOf211])
def test_the_signature_is_read_once_per_class(ddp, monkeypatch):
    distributed.buffer_sync_off(ddp)
    monkeypatch.setattr(inspect, "signature", lambda *_: pytest.fail("signature read again"))
    distributed.buffer_sync_off(ddp)
