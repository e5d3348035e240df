"""Honest throughput telemetry: counted on the host from batch shapes, reduced across ranks only at log time.

Loss records get, under `loop/` keys: step_time (s per optimizer step since the last record), samples_per_second,
tokens_per_second (input tokens, padding included, all ranks), peak_memory_gb (max over ranks; the process's peak
RSS on CPU) and mfu (6 * non-embedding params * tokens/s over the device's peak FLOP/s; GPU only).
Trainer's own counters (num_input_tokens_seen, total_flos) are kept here too, with Trainer's meaning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from transformers.trainer_pt_utils import find_batch_size

# dense bf16 peak TFLOP/s by device name fragment (no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def _peak_tflops(config):
    if config.peak_tflops:
        return config.peak_tflops
    if not torch.cuda.is_available() or config.use_cpu:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def parameter_count(model, exclude_embeddings: bool = False) -> int:
    """All parameters (or all but the nn.Embedding weights, as transformers' num_parameters counts them), also under
    DeepSpeed ZeRO-3, whose parameters are empty placeholders outside its gathers: ds_numel is their real size."""
    skip = (
        {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
        if exclude_embeddings
        else set()
    )
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if n not in skip)


class Telemetry:
    def __init__(self, run, main_input: str):
        self.run, self.main_input = run, main_input
        model = run.unwrapped
        hf = hasattr(model, "num_parameters")
        self.params = parameter_count(model, exclude_embeddings=hf)  # for MFU
        # total_flos counts what Trainer counts: HF models only, through num_parameters (which sees ZeRO-3's
        # placeholders as empty, in Trainer too)
        self.flop_params = model.num_parameters(exclude_embeddings=True) if hf else 0
        self.tokens = self.samples = 0  # since the last loss record, this rank (host ints: no sync)
        self.pending_tokens = self.pending_flos = 0  # not yet moved into the TrainState
        self.unpadded = torch.zeros((), dtype=torch.int64, device=run.accelerator.device)
        self.mode = run.config.include_num_input_tokens_seen
        self.peak = _peak_tflops(run.config)
        self.last_time, self.last_step = time.perf_counter(), run.state.global_step

    def count(self, batch):
        x = batch.get(self.main_input) if isinstance(batch, Mapping) else None
        n = x.numel() if torch.is_tensor(x) else 0
        self.tokens += n
        self.samples += find_batch_size(batch) or 0
        self.pending_tokens += n
        self.pending_flos += 6 * n * self.flop_params
        if self.mode == "non_padding":  # Trainer's rule: the attention mask's sum, else every token
            has_mask = isinstance(batch, Mapping) and "attention_mask" in batch
            self.unpadded += batch["attention_mask"].sum() if has_mask else n  # stays on device

    def _sum(self, values, dtype):
        acc = self.run.accelerator
        return acc.gather(torch.tensor([values], dtype=dtype, device=acc.device)).sum(0).tolist()

    def flush(self):
        """Move this rank's flos and input tokens into the TrainState (Trainer's store_flos). Collective."""
        flos, tokens = self._sum([float(self.pending_flos), float(self.pending_tokens)], torch.float64)
        self.pending_flos = self.pending_tokens = 0
        if self.mode == "non_padding":  # the device counter is read only when it is the one reported
            tokens = int(self.run.accelerator.gather(self.unpadded.unsqueeze(0)).sum().item())
            self.unpadded.zero_()
        state = self.run.state
        state.total_flos += flos
        state.num_input_tokens_seen += int(tokens)

    def record(self, start_time=None, loss_record: bool = False) -> dict:
        from transformers.trainer_utils import speed_metrics

        run, state, out = self.run, self.run.state, {}
        self.flush()
        if self.mode != "no":
            out["num_input_tokens_seen"] = state.num_input_tokens_seen
            if start_time is not None:
                out.update(speed_metrics("train", start_time, num_tokens=state.num_input_tokens_seen))
        if run.config.telemetry and loss_record:
            tokens, samples = self._sum([self.tokens, self.samples], torch.int64)
            self.tokens = self.samples = 0
            now = time.perf_counter()
            dt, steps = now - self.last_time, max(state.global_step - self.last_step, 1)
            self.last_time, self.last_step = now, state.global_step
            out["loop/step_time"] = dt / steps
            out["loop/samples_per_second"] = samples / dt
            out["loop/tokens_per_second"] = tokens / dt
            out["loop/peak_memory_gb"] = self._peak_memory_gb()
            if self.peak and tokens:
                out["loop/mfu"] = 6 * self.params * tokens / dt / (self.peak * 1e12 * run.accelerator.num_processes)
        return out

    def _peak_memory_gb(self):
        acc = self.run.accelerator
        if acc.device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(acc.device) / 2**30], device=acc.device)
            return float(acc.gather(peak).max().item())
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
