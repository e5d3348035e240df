"""Where a data-parallel step's time goes: GPT-2 124M with the fast path (`loop bench`'s gpt2-124m workload, `fast`).
After 20 warm-up steps rank 0 times TIMED steps unprofiled (an environment variable, default 5), then profiles the
next 10. It prints a breakdown of the step from the kernels' own timestamps (compute kernels busy, communication not
hidden behind them, GPU idle) and the CUDA kernels that take the most device time. Run by `benchmarks/gpu_scale.sh
profile` (on 1 GPU and on GPUS) and `ddp-at-one`, or directly:

    accelerate launch --config_file launch_configs/multi_gpu_ddp.yaml --num_processes 2 benchmarks/profile_ddp.py [job args]
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loop  # noqa: E402
from loop.bench import WORKLOADS  # noqa: E402
from loop.job import build_job, build_task  # noqa: E402

if os.environ.get("DDP_AT_ONE") == "1":
    # A world of one process wrapped in DDP all the same (accelerate wraps only from two processes on): DDP's reducer,
    # its buckets, its (one-rank) all-reduces and dynamo's graph split at the buckets, without a second GPU or a link.
    # What this costs over the plain one-GPU step is what DDP costs before any communication does.
    from accelerate.state import DistributedType, PartialState

    PartialState.use_distributed = property(lambda self: self.distributed_type != DistributedType.NO)

TIMED = int(os.environ.get("TIMED", "5"))  # steps timed unprofiled, after 20 warm-up steps
PROFILE_STEPS = 10  # then profiled
START, PROFILED = 20, 20 + TIMED
END = PROFILED + PROFILE_STEPS
argv = (
    WORKLOADS["gpt2-124m"]
    + ["--fast", "true", "--max_steps", str(END + 1), "--disable_tqdm", "true", "--output_dir", "outputs/profile-ddp"]
    + sys.argv[1:]
)
config, module, task = build_job(argv)
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
rank = int(os.environ.get("RANK", "0"))


def busy(intervals):
    """Length of the union of [start, end) intervals: time during which at least one of them runs."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def breakdown(events, steps):
    """Per step, in ms: compute kernels busy, NCCL kernels busy, communication not overlapped by compute, GPU idle."""
    kernels = [
        (e.time_range.start, e.time_range.end, "nccl" in e.name.lower())
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    if not kernels:
        return None
    compute = [(a, b) for a, b, comm in kernels if not comm]
    comm = [(a, b) for a, b, is_comm in kernels if is_comm]
    window = max(b for _, b, _ in kernels) - min(a for a, _, _ in kernels)
    c, n, u = busy(compute), busy(comm), busy(compute + comm)
    ms = lambda us: us / steps / 1e3  # noqa: E731 (profiler times are in microseconds)
    return {"window": ms(window), "compute": ms(c), "nccl": ms(n), "exposed_comm": ms(u - c), "idle": ms(window - u)}


class Profile(loop.Callback):
    prof = None

    def on_step_end(self, run):
        step = run.state.global_step
        if step in (START, PROFILED, END):
            sync()  # a sync point on purpose: the clock reads an idle device
        if step == START:
            if rank == 0:  # the model the step runs: compiled or not, wrapped in DistributedDataParallel or not
                inner = getattr(run.model, "_orig_mod", run.model)
                print(f"model: {type(run.model).__name__} of {type(inner).__name__}", flush=True)
            self.t = time.perf_counter()
        elif step == PROFILED:
            print(
                f"rank {rank}: {(time.perf_counter() - self.t) / TIMED * 1e3:.1f} ms/step unprofiled "
                f"(steps {START + 1}-{PROFILED})",
                flush=True,
            )
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t = time.perf_counter()
        elif step == END and self.prof is not None:
            dt = (time.perf_counter() - self.t) / PROFILE_STEPS
            self.prof.__exit__(None, None, None)
            if rank == 0:
                events = self.prof.key_averages()
                gpu = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
                nccl = sum(e.device_time_total for e in events if "nccl" in e.key.lower())
                print(
                    f"profiled: {dt * 1e3:.1f} ms/step; CUDA kernel time {gpu / 1e4:.1f} ms a step summed over "
                    f"streams, of which NCCL {nccl / 1e4:.1f} ms"
                )
                parts = breakdown(self.prof.events(), PROFILE_STEPS)
                if parts:
                    print(
                        "per step, from kernel timestamps: {window:.1f} ms on the GPU = compute kernels busy "
                        "{compute:.1f} + communication not overlapped {exposed_comm:.1f} + idle {idle:.1f} "
                        "(NCCL kernels busy {nccl:.1f} ms in all)".format(**parts)
                    )
                print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=70))


loop.train(config, callbacks=[Profile()], **build_task(module, task, config))
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)
