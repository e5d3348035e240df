"""Run by tests/gpu/gpu_multi.sh under `accelerate launch`: a job (loop/job.py arguments), SIGKILLed on every rank right
after step $KILL_AFTER_STEP, or in the middle of writing checkpoint-$KILL_IN_SAVE_AT_STEP, when set; rank 0 writes the
log history to <output_dir>/result.json."""

import json
import os
import signal
import sys

import loop
from loop.job import build_job, build_task

kill = int(os.environ.get("KILL_AFTER_STEP", "0"))
kill_in_save = int(os.environ.get("KILL_IN_SAVE_AT_STEP", "0"))
if kill_in_save:  # SIGKILL while checkpoint-N is being written: its files are there, its COMPLETE manifest is not
    import loop.checkpoint as ckpt

    plain_manifest = ckpt.manifest

    def manifest_then_die(folder):
        if folder.rstrip("/").endswith(f"{ckpt.PREFIX}{kill_in_save}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return plain_manifest(folder)

    ckpt.manifest = manifest_then_die


class Killer(loop.Callback):
    def on_step_end(self, run):
        if run.state.global_step == kill:
            os.kill(os.getpid(), signal.SIGKILL)


config, module, task = build_job(sys.argv[1:])
result = loop.train(config, callbacks=[Killer()], **build_task(module, task, config))
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(config.output_dir, "result.json"), "w") as f:
        json.dump(result.log_history, f)
from loop.cli import leave_process_group  # noqa: E402

leave_process_group(0)  # a clean exit under torchrun (see loop/cli.py)
