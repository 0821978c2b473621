"""The CPU dropout path of attention, forward + backward, with autograd's two saved [positions x positions] tensors
(old) and _SoftmaxDropoutValues' one (new), alternating: the time ratio. ``python bench/attention_ab.py``"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import statistics
import time

import torch

import app.engine.attention as A

torch.manual_seed(0)
b, h, L, d = 32, 12, 256, 32


def make():
    q, k, v = (torch.randn(b, h, L, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return q, k, v


mask = torch.ones(b, 1, L, L, dtype=torch.bool)


def old(q, k, v, dropped):
    s = A.masked(torch.matmul(q, k.transpose(-1, -2)).mul_(0.17), mask)
    return torch.matmul(torch.softmax(s, -1).masked_fill(dropped, 0), v)


def new(q, k, v, dropped):
    s = A.masked(torch.matmul(q, k.transpose(-1, -2)).mul_(0.17), mask)
    return A._SoftmaxDropoutValues.apply(s, dropped, v)


times = {"old": [], "new": []}
q, k, v = make()
g = torch.randn(b, h, L, d, dtype=torch.bfloat16)
for _round in range(12):
    for name, f in (("old", old), ("new", new)):
        dropped = A.drop_mask(torch.Size([b, h, L, L]), 0.1)
        t = time.perf_counter()
        f(q, k, v, dropped).backward(g)
        times[name].append(time.perf_counter() - t)
        q.grad = k.grad = v.grad = None
o, n = statistics.median(times["old"][2:]), statistics.median(times["new"][2:])
print(
    f"attention fwd+bwd, batch 32 x 12 heads x 256 tokens, bf16: old {o * 1000:.1f} ms, new {n * 1000:.1f} ms, "
    f"new/old time {n / o:.3f}"
)
