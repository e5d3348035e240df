"""Where a host-bound step's time goes, loop against Trainer (a small model on a GPU: the device idles, the host sets
the pace). Per side: ms inside the step (on_step_begin to on_step_end) and between steps (on_step_end to the next
on_step_begin: logging, callbacks, the next batch), then the functions with the most host time under cProfile.

    python benchmarks/host_time.py --workload tiny-bert [--sides trainer,loop] [--steps 300] [job overrides...]

Sides: trainer, loop (telemetry off: Trainer's records), loop-telemetry, loop-nowatch (stop_on_nonfinite off).
"""

import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

import loop  # noqa: E402
from loop.bench import WORKLOADS  # noqa: E402
from loop.compare import take_option  # noqa: E402
from loop.job import build_job, build_task  # noqa: E402
from loop.training_arguments import to_training_arguments  # noqa: E402

argv = sys.argv[1:]
workload, argv = take_option(argv, "--workload", str, "NAME")
workload = workload or "tiny-bert"
sides, argv = take_option(argv, "--sides", str, "S1,S2")
sides = sides or "trainer,loop"
steps, argv = take_option(argv, "--steps", int, "N")
steps = steps or 300
WARM = 30


class Clock(transformers.TrainerCallback):
    """Host time inside and between steps; cProfile over the second half of the steady steps."""

    def __init__(self, steps):
        self.inside, self.between, self.last_end, self.begin = [], [], None, None
        self.prof, self.steps = cProfile.Profile(), steps

    def on_step_begin(self, args, state, control, **kw):
        now = time.perf_counter()
        if self.last_end is not None and state.global_step > WARM:
            self.between.append(now - self.last_end)
        self.begin = now
        if state.global_step == (WARM + self.steps) // 2:
            self.prof.enable()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if state.global_step > WARM:
            self.inside.append(now - self.begin)
        self.last_end = now
        if state.global_step == self.steps - 1:
            self.prof.disable()


for side in sides.split(","):
    config, module, task = build_job(
        WORKLOADS[workload]
        + argv
        + ["--max_steps", str(steps), "--output_dir", f"outputs/host-{side}", "--overwrite_output_dir", "true"]
    )
    config.telemetry = side == "loop-telemetry"  # by default what Trainer records, no more
    if side == "loop-nowatch":
        config.stop_on_nonfinite = False
    built = build_task(module, task, config)
    clock = Clock(steps)
    if side == "trainer":
        trainer = transformers.Trainer(
            model=built["model"],
            args=to_training_arguments(config),
            train_dataset=built["train_dataset"],
            data_collator=built.get("data_collator"),
            callbacks=[clock],
        )
        trainer.train()
    else:
        loop.train(config, callbacks=[clock], **built)
    n = len(clock.inside)
    half = n // 2
    print(
        f"=== {side}: inside the step {1000 * sum(clock.inside[:half]) / half:.2f} ms, between steps "
        f"{1000 * sum(clock.between[:half]) / max(1, min(half, len(clock.between))):.2f} ms (steps {WARM}-{WARM + half}"
        ", no profiler)"
    )
    out = io.StringIO()
    pstats.Stats(clock.prof, stream=out).sort_stats("tottime").print_stats(30)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
