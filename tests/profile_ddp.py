"""Where a data-parallel step's time goes: GPT-2 124M with the fast path (`loop bench`'s gpt2-124m workload, `fast`),
36 steps; rank 0 times steps 21-25 unprofiled, then profiles steps 26-35 and prints the CUDA kernels that take the most
device time, with the NCCL share. Run by `tests/gpu_scale.sh profile`, or directly:

    accelerate launch --config_file launch_configs/multi_gpu_ddp.yaml --num_processes 2 tests/profile_ddp.py [job args]
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loop  # noqa: E402
from loop.bench import WORKLOADS  # noqa: E402
from loop.job import build_job, build_task  # noqa: E402

argv = WORKLOADS["gpt2-124m"] + ["--fast", "true", "--max_steps", "36", "--disable_tqdm", "true",
                                 "--output_dir", "outputs/profile-ddp"] + sys.argv[1:]
config, module, task = build_job(argv)
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
rank = int(os.environ.get("RANK", "0"))


class Profile(loop.Callback):
    prof = None

    def on_step_end(self, run):
        step = run.state.global_step
        if step in (20, 25, 35):
            sync()  # a sync point on purpose: the clock reads an idle device
        if step == 20:
            self.t = time.perf_counter()
        elif step == 25:
            print(f"rank {rank}: {(time.perf_counter() - self.t) / 5 * 1e3:.1f} ms/step unprofiled", flush=True)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t = time.perf_counter()
        elif step == 35 and self.prof is not None:
            dt = (time.perf_counter() - self.t) / 10
            self.prof.__exit__(None, None, None)
            if rank == 0:
                events = self.prof.key_averages()
                gpu = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
                nccl = sum(e.device_time_total for e in events if "nccl" in e.key.lower())
                print(f"profiled: {dt * 1e3:.1f} ms/step; CUDA kernel time {gpu / 1e4:.1f} ms a step summed over "
                      f"streams, of which NCCL {nccl / 1e4:.1f} ms")
                print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=70))


loop.train(config, callbacks=[Profile()], **build_task(module, task, config))
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)
