"""Run by test_distributed.py under torchrun (2 CPU processes, gloo): the EMA over FSDP2 shards (fully_shard on
CPU; accelerate runs FSDP on GPUs only) against the EMA of the same model unsharded. Exits non-zero on a mismatch."""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

from helpers import tiny_gpt2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from loop.checkpoint import ema_file_name  # noqa: E402
from loop.ema import EMA  # noqa: E402

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
reference = tiny_gpt2()
sharded = copy.deepcopy(reference)
for block in sharded.transformer.h:
    fully_shard(block, mesh=mesh)
fully_shard(sharded, mesh=mesh)

ema_ref, ema = EMA(reference, 0.9, warmup=True), EMA(sharded, 0.9, warmup=True)
assert ema.sharded and not ema_ref.sharded
for step in range(1, 5):  # the same weight changes on both models, then an EMA update
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(reference.parameters(), sharded.parameters())):
            p.add_(0.01 * step * (i + 1))
            q.add_(0.01 * step * (i + 1))
    ema_ref.update(reference, step)
    ema.update(sharded, step)

# each rank keeps only its shards
held, whole = sum(t.numel() for t in ema.state_dict().values()), sum(t.numel() for t in ema_ref.shadow)
assert held <= whole * 0.6, (held, whole)
# gathered, the sharded EMA is the unsharded EMA, bit for bit
for a, b in zip(ema.shadow, ema_ref.shadow):
    assert torch.equal(a.full_tensor(), b)
# saved per rank as the checkpoint does, changed, loaded back: restored exactly
path = os.path.join(out, ema_file_name(ema, rank))
save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, path)
saved = {k: v.clone() for k, v in ema.state_dict().items()}
torch._foreach_mul_(ema.shadow, 0.0)
ema.load_state_dict(load_file(path))
assert all(torch.equal(ema.state_dict()[k], saved[k]) for k in saved)
# swapped in (the final model's ema/ folder and eval_ema), the model holds the EMA; swapped back, its own weights.
# As in the loop, an evaluation forward comes first: FSDP2 leaves the root's parameters unsharded after it (seen on a
# GPU: the swap then mixed plain tensors and DTensors)
own = [p.full_tensor().clone() for p in sharded.parameters()]
with torch.no_grad():
    sharded.eval()
    sharded(torch.randint(0, 64, (2, 8)))
ema.swap(sharded)
assert all(torch.equal(p.full_tensor(), e) for p, e in zip(sharded.parameters(), ema_ref.shadow))
ema.swap(sharded)
assert all(torch.equal(p.full_tensor(), w) for p, w in zip(sharded.parameters(), own))
print(f"rank {rank}: OK, {held} of {whole} EMA values held")
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
