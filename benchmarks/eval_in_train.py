"""Each evaluation's eval_runtime inside a training run, the loop's or Trainer's (GPU; GPT-2 124M real shape, eager
bf16, 40 steps, an evaluation of 512 packed rows every 10). Run from the repo root, each side in its own process:
    python benchmarks/eval_in_train.py loop|trainer OUTDIR [job overrides...]
(bash benchmarks/gpu_speed.sh eval OUT runs both sides twice, alternating, after benchmarks/eval_speed.py)."""

import sys
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, ".")
from transformers import Trainer

import loop
from loop.compare import _TRAINER_KEYS
from loop.job import build_job, build_task

side, out = sys.argv[1], sys.argv[2]
argv = [
    "--config",
    "tasks/configs/gpt2_124m.yaml",
    "--model_config",
    '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}',
    "--max_steps",
    "40",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "10",
    "--max_eval_samples",
    "512",
    "--save_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--disable_tqdm",
    "true",
    "--output_dir",
    out,
    "--logging_steps",
    "10",
] + sys.argv[3:]
config, module, task = build_job(argv)
built = build_task(module, task, config)  # under the run's seed, as `loop compare` builds each side
model = built.pop("model")
t0 = time.time()
if side == "loop":
    res = loop.train(config, model, **built)
    hist = res.log_history
else:
    kwargs = {
        k: v for k, v in built.items() if k in _TRAINER_KEYS and v is not None
    }  # what `loop compare` hands Trainer
    tr = Trainer(model=model, args=config.to_training_arguments(output_dir=out + "/t"), **kwargs)
    tr.train()
    hist = tr.state.log_history
print(
    f"{side}: eval_runtime "
    + " ".join(f"{r['eval_runtime']:.3f}" for r in hist if "eval_runtime" in r)
    + f" | total wall {time.time() - t0:.1f} s | train_runtime {[r.get('train_runtime') for r in hist if 'train_runtime' in r]}"
)
