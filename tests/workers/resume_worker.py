"""Run by test_resume.py: train the tiny GPT-2 in a subprocess, optionally SIGKILL itself at a chosen moment.

argv: OUT [key=value ...]; special keys: kill_after_step=N, kill_in_microbatch=N (the Nth forward call),
kill_in_save=N (while writing the checkpoint of step N), term_after_step=N (SIGTERM instead of SIGKILL, with
enable_jit_checkpoint=true; term_rank=R: on that rank only), term_in_final_save=1 (SIGTERM while the final model
is written), resume=latest. A preempted run exits 143, as the CLI.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

from helpers import LMData, tiny_gpt2  # noqa: E402

import loop  # noqa: E402
import loop.checkpoint  # noqa: E402

out = sys.argv[1]
opts = dict(a.split("=", 1) for a in sys.argv[2:])
kill_after_step = int(opts.pop("kill_after_step", 0))
kill_in_microbatch = int(opts.pop("kill_in_microbatch", 0))
kill_in_save = int(opts.pop("kill_in_save", 0))
term_after_step = int(opts.pop("term_after_step", 0))
term_rank = opts.pop("term_rank", None)
term_in_final_save = opts.pop("term_in_final_save", None)
resume = opts.pop("resume", None)
n_train = int(opts.pop("n_train", 40))
base = dict(
    output_dir=out,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_steps=14,
    logging_steps=1,
    save_steps=3,
    eval_strategy="steps",
    eval_steps=4,
    learning_rate=1e-3,
    use_cpu=True,
    disable_tqdm=True,
    telemetry=False,
    per_device_eval_batch_size=4,
)
base.update(opts)
config = loop.TrainConfig(**base)


class Killer(loop.Callback):
    def on_step_end(self, run):
        if run.state.global_step == kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if run.state.global_step == term_after_step and term_rank in (None, os.environ.get("RANK", "0")):
            os.kill(os.getpid(), signal.SIGTERM)


class Wrapper(loop.Callback):
    """Records what trains the model (wrapper.json, rank 0): the prepared model's class, and whether any DDP wrapper
    is still alive (its reducer holds a gradient-sized set of buckets)."""

    def on_train_begin(self, run):
        import gc

        import torch

        alive = any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        if int(os.environ.get("RANK", "0")) == 0:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "wrapper.json"), "w") as f:
                json.dump({"model": type(run.model).__name__, "ddp_alive": alive}, f)


model = tiny_gpt2(dropout=0.1)
if kill_in_microbatch:
    calls = {"n": 0}

    def count_forward(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == kill_in_microbatch:
                os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(count_forward)
if kill_in_save:
    real = loop.checkpoint.save_weights

    def dying_save(state_dict, path):
        real(state_dict, path)
        if f".tmp-checkpoint-{kill_in_save}" in path:
            os.kill(os.getpid(), signal.SIGKILL)

    loop.checkpoint.save_weights = dying_save

if term_in_final_save:
    import loop.fit

    real_write = loop.fit._write_model

    def write_under_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        real_write(*args)

    loop.fit._write_model = write_under_sigterm

from loop.cli import leave_process_group  # noqa: E402

try:
    result = loop.train(
        config,
        model,
        LMData(n_train, ragged=True),
        eval_dataset=LMData(10, seed=1),
        callbacks=[Killer(), Wrapper()],
        resume_from_checkpoint=resume,
    )
except loop.Preempted as e:
    print(f"error: {e}", file=sys.stderr)
    leave_process_group(143)
    sys.exit(143)
if int(os.environ.get("RANK", "0")) == 0:  # also run under torchrun by test_distributed.py
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result.log_history, f)
leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
