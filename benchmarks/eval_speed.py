"""The evaluation pass alone, the loop's against Trainer's, on the same model and data (GPU; GPT-2 124M real shape,
512 packed rows): three alternating timed runs each, then one of each under the profiler (host syncs, copies, the
host ops that take longest). Run from the repo root: python benchmarks/eval_speed.py (see benchmarks/gpu_speed.sh eval).
Inside a training run the loop's evaluation measured slower than Trainer's (docs/benchmarks/); this isolates it.
"""

import copy
import warnings

import torch

warnings.filterwarnings("ignore")
from transformers import Trainer

from loop.evaluation import evaluate
from loop.job import build_job

argv = [
    "--config",
    "tasks/configs/gpt2_124m.yaml",
    "--model_config",
    '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}',
    "--max_eval_samples",
    "512",
    "--output_dir",
    "/tmp/evc",
    "--disable_tqdm",
    "true",
]
config, module, task = build_job(argv)
built = module.build(task, config)
model0 = built.pop("model").cpu()
keys = dict(
    data_collator=built.get("data_collator"),
    compute_metrics=built.get("compute_metrics"),
    preprocess_logits_for_metrics=built.get("preprocess_logits_for_metrics"),
    processing_class=built.get("processing_class"),
)


def loop_eval(model):
    return evaluate(config, model, built["eval_dataset"], **keys)


def trainer_eval(model):
    tr = Trainer(
        model=model,
        args=config.to_training_arguments(output_dir="/tmp/evt"),
        eval_dataset=built["eval_dataset"],
        **keys,
    )
    return tr.evaluate()


def prof(fn, name):
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as p:
        m = fn(copy.deepcopy(model0))
        torch.cuda.synchronize()
    ka = {e.key: e for e in p.key_averages()}
    cnt = lambda k: ka[k].count if k in ka else 0
    dev = (
        sum(e.self_device_time_total for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    )
    print(
        f"{name} profiled: runtime {m['eval_runtime']:.2f} s, device {dev:.2f} s, syncs {cnt('cudaStreamSynchronize')}+{cnt('cudaDeviceSynchronize')}, item {cnt('aten::item')}, HtoD {cnt('Memcpy HtoD (Pinned -> Device)')}/{cnt('Memcpy HtoD (Pageable -> Device)')}, DtoH {cnt('Memcpy DtoH (Device -> Pinned)')}/{cnt('Memcpy DtoH (Device -> Pageable)')}, to {cnt('aten::to')}, copy_ {cnt('aten::copy_')}"
    )
    print(
        "   top host ops: "
        + ", ".join(
            f"{e.key[:38]} {e.self_cpu_time_total / 1e6:.2f}s x{e.count}"
            for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        )
    )


for i in range(3):
    for name, fn in (("loop", loop_eval), ("trainer", trainer_eval)):
        m = fn(copy.deepcopy(model0))
        torch.cuda.synchronize()
        print(f"{name} run {i}: eval_loss {m['eval_loss']:.5f} eval_runtime {m['eval_runtime']:.3f} s")
prof(loop_eval, "loop")
prof(trainer_eval, "trainer")
