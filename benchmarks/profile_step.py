"""Profile the steady-state optimizer step of the loop and of Trainer on one job (GPU): where the time and memory go.

    python benchmarks/profile_step.py OUTDIR --workload gpt2-124m [--sides loop,trainer] [job overrides...]
    python benchmarks/profile_step.py OUTDIR --config tasks/configs/sst2_minilm.yaml --model_name_or_path .data/minilm ...

Per side: ms per step over PROF steps (after WARM), host syncs and copies per step, memory allocated when the
model's forward returns and the peak within a step, and the CUDA kernels that take the most device time.
"""

import copy
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Trainer, TrainerCallback  # noqa: E402

import loop  # noqa: E402
from loop.bench import WORKLOADS  # noqa: E402
from loop.compare import take_option  # noqa: E402
from loop.job import build_job  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
workload, argv = take_option(argv, "--workload", str, "gpt2-124m")
sides, argv = take_option(argv, "--sides", str, "loop,trainer")
WARM, PROF = 15, 10
argv = (
    (WORKLOADS[workload] if workload else [])
    + argv
    + [
        "--max_steps",
        str(WARM + PROF + 1),
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--disable_tqdm",
        "true",
        "--output_dir",
        out,
    ]
)
config, module, task = build_job(argv)
built = module.build(task, config)
model0 = built.pop("model")
GB = 2**30


class Probe:
    """Timing, a profiler over PROF steps, and memory: allocated when forward returns, peak per step."""

    def __init__(self):
        self.prof = self.t = self.dt = None
        self.after_forward, self.peaks = [], []

    def hook(self, model):
        model.register_forward_hook(lambda m, i, o: self.after_forward.append(torch.cuda.memory_allocated() / GB))

    def end(self, step):  # the peak since the previous step's end: this step's
        self.peaks.append(torch.cuda.max_memory_allocated() / GB)
        torch.cuda.reset_peak_memory_stats()
        # one step under CUDA's sync debug mode: every synchronising op warns, with the Python stack that made it
        torch.cuda.set_sync_debug_mode("warn" if step == WARM - 2 else 0)
        if step == WARM:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA], with_stack=True
            )
            self.prof.__enter__()
            self.t = time.perf_counter()
        if step == WARM + PROF:
            torch.cuda.synchronize()
            self.dt = (time.perf_counter() - self.t) / PROF
            self.prof.__exit__(None, None, None)


def report(name, p):
    print(
        f"=== {name}: {p.dt * 1000:.2f} ms/step over {PROF} steps (profiler on); memory GB: after forward "
        f"{p.after_forward[-1]:.2f}, step peak {max(p.peaks[-PROF:]):.2f}, max over run {max(p.peaks):.2f}"
    )
    ka = p.prof.key_averages()
    for key in (
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "aten::item",
        "aten::_local_scalar_dense",
        "cudaLaunchKernel",
        "Memcpy HtoD (Pageable -> Device)",
        "Memcpy DtoH (Device -> Pageable)",
    ):
        n = sum(e.count for e in ka if e.key == key)
        print(f"  {key}: {n / PROF:.2f}/step")
    events = p.prof.events()
    # where each host-side sync is called from: its chain of enclosing ops (runtime calls carry no Python stack)
    chains = {}
    for e in events:
        if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"):
            up, names = e.cpu_parent, []
            while up is not None and len(names) < 6:
                names.append(up.name[:60])
                up = up.cpu_parent
            key = e.name + " <- " + (" <- ".join(names) or "(no enclosing op)")
            chains[key] = chains.get(key, 0) + 1
    for key, n in sorted(chains.items(), key=lambda kv: -kv[1]):
        print(f"  x{n / PROF:.1f}/step {key}")
    # the device's idle time: the profiled span less the union of every kernel, copy and memset on the device
    busy = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if busy:
        covered, (lo, hi) = 0.0, busy[0]
        for a, b in busy[1:]:
            if a > hi:
                covered, lo, hi = covered + hi - lo, a, b
            else:
                hi = max(hi, b)
        covered += hi - lo
        span = busy[-1][1] - busy[0][0]
        print(f"  device busy {covered / PROF / 1000:.2f} ms/step, idle {(span - covered) / PROF / 1000:.2f} ms/step")
    cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:10]
    print(
        "  host (CPU) time per step by op: "
        + ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / PROF / 1000:.2f} ms" for e in cpu)
    )
    # device-side ranges of host annotations (e.g. "Optimizer.step#AdamW.step") span kernels counted on their own:
    # left out, or the optimizer's 9 ms range would be counted on top of its own kernels
    kernels = sorted(
        (
            e
            for e in ka
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and not e.key.startswith(("Optimizer.", "## ", "ProfilerStep"))
        ),
        key=lambda e: -e.self_device_time_total,
    )
    total = sum(e.self_device_time_total for e in kernels)
    print(f"  device time {total / PROF / 1000:.2f} ms/step; top kernels:")
    for e in kernels[: int(os.environ.get("PROFILE_TOP", "14"))]:
        print(
            f"  {100 * e.self_device_time_total / total:5.1f}%  {e.self_device_time_total / PROF / 1000:7.2f} ms  "
            f"x{e.count // PROF:<4} {e.key if len(e.key) <= 110 else e.key[:55] + ' ... ' + e.key[-50:]}"
        )
    kinds = {}  # the same kernels by kind, from their names (first match wins)
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0) + e.self_device_time_total
    print(
        "  by kind (ms/step): "
        + ", ".join(f"{k} {v / PROF / 1000:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    )


KINDS = [
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas")),
    ("inductor (fused elementwise, reductions)", ("triton",)),
    ("copies", ("memcpy", "memset", "copy")),
]


def show_sync(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.format_stack()[:-2] if "/torch/" not in f and "warnings.py" not in f]
    print(f"SYNC {str(message)[:80]} at " + " <- ".join(f.strip().split(chr(10))[0] for f in frames[-5:][::-1]))


warnings.showwarning = show_sync
warnings.simplefilter("always")
probes = {}
for side in (sides or "loop,trainer").split(","):
    p = probes[side] = Probe()
    model = copy.deepcopy(model0)
    p.hook(model)
    if side == "loop":
        cb = type("P", (loop.Callback,), {"on_step_end": lambda self, run: p.end(run.state.global_step)})
        loop.train(config, model, callbacks=[cb()], **built)
    else:
        cb = type("P", (TrainerCallback,), {"on_step_end": lambda self, a, s, c, **k: p.end(s.global_step)})
        keys = ("train_dataset", "data_collator", "compute_loss_func")
        tr = Trainer(
            model=model,
            args=config.to_training_arguments(output_dir=out + "/t"),
            callbacks=[cb()],
            **{k: v for k, v in built.items() if k in keys},
        )
        tr.train()
    torch.cuda.empty_cache()
for side, p in probes.items():
    report(side, p)
