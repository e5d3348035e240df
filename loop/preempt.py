"""enable_jit_checkpoint: a SIGTERM (a scheduler's preemption or time-limit notice: Slurm's `--signal=TERM@60`,
Kubernetes' grace period) becomes a complete checkpoint at the next optimizer-step boundary and a clean stop.

Why a vote. Every rank must save together (the save gathers state) and stop at the same step, but the signal
reaches the ranks at different moments, or only one of them. So at every step boundary the ranks take a vote: one
all-reduce (MAX) of a CPU int over a gloo group made for it. That is host-side only (no CUDA sync, nothing queued
on the GPU) and only when the field is on; a single process just reads its own flag.

What is left. checkpoint-<step>, complete (manifest and COMPLETE marker, as every checkpoint), and no final model:
a preempted run must not look finished. `train` raises `Preempted` (the CLI exits 143, 128 + SIGTERM) with one line
naming the checkpoint; `--resume_from_checkpoint latest` continues it exactly.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

from .errors import LoopError


class Preempted(LoopError):
    """Training stopped on SIGTERM after saving a checkpoint (enable_jit_checkpoint)."""


class Preemption:
    def __init__(self, accelerator):
        self.requested = False
        # gloo: the vote stays on the host whatever backend the gradients use
        self.group = dist.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested = True  # acted on at the next step boundary, never inside a step or a save

    def voted(self) -> bool:
        """Whether any rank got SIGTERM: every rank calls this at every step boundary (a host-side collective)."""
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())  # a CPU tensor: no device sync

    def close(self):
        signal.signal(signal.SIGTERM, self.previous)
        if self.group is not None:
            dist.destroy_process_group(self.group)


@contextlib.contextmanager
def preemption(run):
    """run.preemption for the length of training when enable_jit_checkpoint is on; the SIGTERM handler put back after."""
    if not run.config.enable_jit_checkpoint:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise LoopError(
            "enable_jit_checkpoint catches SIGTERM, which Python delivers to the main thread only: call "
            "train() from the main thread, or set enable_jit_checkpoint false"
        )
    run.preemption = Preemption(run.accelerator)
    try:
        yield
    finally:
        run.preemption.close()
        run.preemption = None
