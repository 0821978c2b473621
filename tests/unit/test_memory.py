"""The CPU training loop's memory bound: with heap reuse on, freed buffers stay resident until the loop trims the
heap past its limit; a run reports its peak."""

import json
import os
import subprocess
import sys

import pytest

from app.config import PROJECT_ROOT

FRAGMENT_AND_TRIM = """
import json, torch
from app.engine.memory import keep_freed_memory_in_heap, resident_bytes, trim_heap_above
assert keep_freed_memory_in_heap()
blocks = [torch.ones(2_000_000 + 100_000 * i) for i in range(40)]  # a step's activations: 8-24 MB each
del blocks  # freed, but with heap reuse on they stay resident
before = resident_bytes()
untouched = trim_heap_above(before * 2)
trimmed = trim_heap_above(0)
print(json.dumps({"before": before, "after": resident_bytes(), "untouched": untouched, "trimmed": trimmed}))
"""


def test_the_heap_keeps_freed_blocks_until_trimmed_past_the_limit():
    done = subprocess.run(  # heap reuse is process-wide: its own process
        [sys.executable, "-c", FRAGMENT_AND_TRIM], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert not run["untouched"] and run["trimmed"]  # below the limit nothing happens
    assert run["before"] - run["after"] > 100 * 2**20  # the freed blocks (8-24 MB each) went back to the kernel


RESTART = """
from app.config import Settings
from app.engine.memory import allocator_in_use
from app.ops.allocator import restart_with_allocator

print("before", allocator_in_use(), flush=True)
restart_with_allocator(Settings())
print("after", allocator_in_use())
"""


@pytest.mark.parametrize("setting", ["jemalloc", "glibc"])
def test_a_training_process_restarts_itself_with_the_allocator_the_setting_names(setting):
    env = os.environ | {"ALLOCATOR": setting}
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-c", RESTART], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if setting == "glibc":
        assert proc.stdout.split() == ["before", "glibc", "after", "glibc"]
    else:  # the process ran again from the start, with jemalloc preloaded (CI installs libjemalloc2)
        assert proc.stdout.split() == ["before", "glibc", "before", "jemalloc", "after", "jemalloc"]
