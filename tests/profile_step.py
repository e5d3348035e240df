"""Profile the steady-state step of the loop and of Trainer on the SST-2/MiniLM job (GPU): what each does per step.

python tests/profile_step.py OUTDIR  -> prints the top CPU-side ops and the count of device syncs/copies per step.
"""

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Trainer, TrainerCallback  # noqa: E402

import loop  # noqa: E402
from loop.job import build_job  # noqa: E402

out = sys.argv[1]
config, module, task = build_job(["--config", "tasks/configs/sst2_minilm.yaml", "--model_name_or_path", ".data/minilm",
                                  "--train_file", ".data/sst2/train.tsv", "--validation_file",
                                  ".data/sst2/validation.tsv", "--max_steps", "260", "--eval_strategy", "no",
                                  "--save_strategy", "no", "--load_best_model_at_end", "false", "--disable_tqdm",
                                  "--output_dir", out, *sys.argv[2:]])
built = module.build(task, config)
model0 = built.pop("model")
WARM, PROF = 200, 40


def report(name, prof, dt):
    print(f"=== {name}: {dt * 1000:.2f} ms/step over {PROF} steps")
    ka = prof.key_averages()
    for key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "Memcpy HtoD (Pageable -> Device)",
                "Memcpy DtoH (Device -> Pageable)", "aten::item", "aten::_local_scalar_dense", "cudaLaunchKernel",
                "Memcpy HtoD (Pinned -> Device)"):
        n = sum(e.count for e in ka if e.key == key)
        print(f"  {key}: {n / PROF:.2f}/step")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18))


class Prof:
    def __init__(self):
        self.prof, self.t = None, None

    def at(self, step):
        if step == WARM:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t = time.perf_counter()
        if step == WARM + PROF:
            torch.cuda.synchronize()
            self.dt = (time.perf_counter() - self.t) / PROF
            self.prof.__exit__(None, None, None)


lp = Prof()
L = type("L", (loop.Callback,), {"on_step_end": lambda self, run: lp.at(run.state.global_step)})
loop.train(config, copy.deepcopy(model0), callbacks=[L()], **built)
tp = Prof()
T = type("T", (TrainerCallback,), {"on_step_end": lambda self, a, s, c, **k: tp.at(s.global_step)})
tr = Trainer(model=copy.deepcopy(model0), args=config.to_training_arguments(output_dir=out + "/t"), callbacks=[T()],
             train_dataset=built["train_dataset"], data_collator=built["data_collator"])
tr.train()
report("loop", lp.prof, lp.dt)
report("Trainer", tp.prof, tp.dt)
