"""What the link between the GPUs gives: all-reduce time and bandwidth for 25, 150 and 500 MB of fp32, one process per
GPU (GPT-2 124M's gradients are 498 MB). Run by `benchmarks/gpu_scale.sh profile`:

    torchrun --nproc_per_node 2 benchmarks/allreduce_probe.py
"""

import time

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank % torch.cuda.device_count())
for mb in (25, 150, 500):
    x = torch.ones(mb * 2**20 // 4, device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()  # the clock starts and stops with the device idle
    t = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    if rank == 0:
        print(
            f"all_reduce {mb} MB fp32 over {dist.get_world_size()} GPUs: {dt * 1e3:.2f} ms, "
            f"algbw {mb / 1024 / dt:.1f} GB/s",
            flush=True,
        )
dist.destroy_process_group()
