"""The CPU training loop's memory bound: with heap reuse on, freed buffers stay resident until the loop trims the
heap past its limit; a run reports its peak."""

import json
import subprocess
import sys

from app.config import PROJECT_ROOT

FRAGMENT_AND_TRIM = """
import json, torch
from app.engine.training import keep_freed_memory_in_heap, resident_bytes, trim_heap_above
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
