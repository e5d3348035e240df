"""`cuda_graph_step`: the whole optimizer step (forward, backward, clip, optimizer) replayed from one CUDA graph.

A small model's step is bound by the host: the model's Python and hundreds of kernel launches for a few ms of GPU
work. Recorded once as a CUDA graph, the step is one launch.

How (one graph per window shape, i.e. per batch width under dynamic padding):
  * the first two windows of a shape (WARMUP) run the ordinary eager step (step.optimizer_step) on the side stream
    the graphs are recorded on: the warm-up a capture needs (compilation, lazy optimizer state, cuBLAS/cuDNN
    workspaces for that stream), and real training steps;
  * the third is recorded: the window is copied into input buffers the graph owns, the same step code
    (step.forward_backward + step.clip_and_step) runs under torch.cuda.graph, the gradients are let go at the end
    (they live only inside a replay), and the graph is replayed for this window; all graphs share one memory pool;
  * later windows of that shape are copied into its buffers and replayed.
What stays on the host, every step, as in the eager step: the learning rate (filled into the tensors the recorded
optimizer reads; the scheduler keeps its plain floats, so nothing syncs), the logged loss (step.track_loss on the
graph's output losses), the non-finite watch, the scheduler and the EMA (step.finish_step).

Numerics: a replay runs the eager step's kernels on the same inputs and draws dropout from the same generator
offsets, so with deterministic kernels it gives the eager step's losses and grad norms to the bit
(tests/gpu/test_gpu.py checks it); without them both drift as GPU runs do (atomic adds). transformers drops an
all-ones attention mask only when it can look at it (a host sync), never while a graph records, so a recorded step
keeps it. A capture that fails stops the run with one line (CUDA's random generator is left mid-capture, so not even
an eager step could follow). `fast` records the step only where it was verified: batches cut from the device table
(dataset_on_device), the model compiled or eager. Batches from the host loader's pin-memory thread are refused: it
makes CUDA calls while the graph records, which CUDA's default capture mode forbids from any thread; unpinned host
batches may be asked for. Not with fp16's loss scaler, an optimizer that cannot step inside a graph (torch's Adam
family can: `capturable`), gradient checkpointing, a compile mode that records graphs itself or DeepSpeed's engine,
and on one CUDA process only. What was measured, and where: docs/benchmarks/.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import torch

from .config import compile_records_graphs
from .errors import LoopError
from .step import clip_and_step, finish_step, forward_backward, optimizer_step, track_loss

WARMUP = 2  # eager windows of a shape before it is recorded: a recompilation (a guard failing at the second call,
# e.g. a head setting config.problem_type in its first forward) must happen before the capture, never inside it
MAX_GRAPHS = 64  # shapes beyond this many keep running eagerly (each graph holds its activations in the pool)


def why_not(config, acc, opt, device_table, custom_step: bool, step_events: bool = False) -> str | None:
    """Why the graphed step cannot serve this run (one line with the fix), or None when it can."""
    if custom_step:
        return "cuda_graph_step records the loop's own step, not a custom optimizer_step; set cuda_graph_step false"
    if step_events:
        return (
            "cuda_graph_step replays the step without running Python, so a callback's on_substep_end, "
            "on_pre_optimizer_step or on_optimizer_step would not run; set cuda_graph_step false"
        )
    if acc.device.type != "cuda":
        return f"cuda_graph_step needs a CUDA device (this run is on {acc.device.type}); set cuda_graph_step false"
    if acc.distributed_type.name == "DEEPSPEED":
        return "cuda_graph_step records torch's optimizer step, not DeepSpeed's engine; set cuda_graph_step false"
    if acc.num_processes > 1:
        return (
            "cuda_graph_step runs on one process (the gradient all-reduce is not recorded); set cuda_graph_step "
            "false under DDP, FSDP or DeepSpeed"
        )
    if device_table is None and config.dataloader_pin_memory:
        return (
            "cuda_graph_step with pinned host batches: the DataLoader's pin-memory thread makes CUDA calls while "
            "the graph records, which CUDA's capture forbids; set dataset_on_device true (or "
            "dataloader_pin_memory false), or cuda_graph_step false"
        )
    if config.mixed_precision == "fp16":
        return (
            "cuda_graph_step cannot record fp16's loss scaler (it decides on the host whether to step); use bf16 "
            "or set cuda_graph_step false"
        )
    if not all("capturable" in g for g in opt.param_groups):
        return (
            f"cuda_graph_step needs an optimizer that can step inside a CUDA graph (torch's Adam family, "
            f"`capturable`); {type(getattr(opt, 'optimizer', opt)).__name__} cannot: use optim adamw_torch_fused "
            "or set cuda_graph_step false"
        )
    if conflict := compile_records_graphs(config):
        return conflict
    if "underflow_overflow" in config.debug.split():
        return (
            "debug underflow_overflow checks every module's output on the host, which a CUDA graph cannot "
            "record; set cuda_graph_step false (or drop debug)"
        )
    if config.gradient_checkpointing:
        return (
            "gradient_checkpointing re-runs forwards with saved RNG states, which a CUDA graph cannot record; "
            "set cuda_graph_step false"
        )
    return None


def _shape_key(window):
    """What a graph is recorded for: every micro-batch's columns, shapes and dtypes; None if not all tensors."""
    if not all(isinstance(b, Mapping) and all(torch.is_tensor(v) for v in b.values()) for b in window):
        return None
    return tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in b.items()) for b in window)


class _Graph:
    def __init__(self, inputs, losses, grad_norm, replay):
        self.inputs, self.losses, self.grad_norm, self.replay = inputs, losses, grad_norm, replay


class GraphStep:
    """A step_fn (run, window) -> grad_norm; see the module docstring. `record=False` runs the recorded body eagerly
    on the graph's input buffers instead of replaying a graph (how the CPU tests check the bookkeeping)."""

    def __init__(self, run, record: bool = True):
        self.run, self.record = run, record
        self.graphs: dict = {}
        self.seen = collections.Counter()
        self.pool = None
        # warm-ups and captures share one side stream (as torch's make_graphed_callables warms up on a side stream):
        # what cuBLAS/cuDNN set up per stream exists before the capture instead of being made inside it
        self.stream = torch.cuda.Stream() if record else None
        self.lrs = None  # the tensors the recorded optimizer reads its learning rates from
        self.filled: list = []

    def __call__(self, run, window):
        key = _shape_key(window)
        graph = self.graphs.get(key)
        if graph is None:
            if key is None or self.seen[key] < WARMUP or len(self.graphs) >= MAX_GRAPHS:
                self.seen[key] += 1
                return self._eager(run, window)  # the warm-up of this shape, or a shape left eager
            graph = self._capture(key, window)
        run.model.train()
        for buffers, batch in zip(graph.inputs, window):
            for k, v in batch.items():
                buffers[k].copy_(v, non_blocking=True)
        self._fill_lrs()
        graph.replay()
        for loss, batch in zip(graph.losses, window):
            track_loss(run, loss, batch)
        grad_norm = graph.grad_norm.clone()  # the graph's own output is overwritten by its next replay
        finish_step(run, grad_norm)
        return grad_norm

    def _eager(self, run, window):
        if self.stream is None:
            return optimizer_step(run, window)
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            grad_norm = optimizer_step(run, window)
        main.wait_stream(self.stream)  # main-stream work after this reads what the side stream wrote
        return grad_norm

    def _body(self, inputs):
        run = self.run
        losses = forward_backward(run, inputs)
        grad_norm = clip_and_step(run)
        run.model.zero_grad(set_to_none=True)  # the gradients live only inside a replay
        return torch.stack(losses), grad_norm

    def _fill_lrs(self):
        """The scheduler's current learning rates into the tensors the recorded optimizer reads (no sync)."""
        if self.lrs is None:
            return
        for i, (group, t) in enumerate(zip(self.run.optimizer.param_groups, self.lrs)):
            lr = float(group["lr"])
            if self.filled[i] != lr:
                t.fill_(lr)
                self.filled[i] = lr

    def _capture(self, key, window):
        run = self.run
        run.model.train()
        inputs = [{k: v.clone() for k, v in b.items()} for b in window]
        if not self.record:  # the body runs at every "replay", on the copied inputs
            graph = _Graph(inputs, None, None, None)

            def replay():
                graph.losses, graph.grad_norm = self._body(inputs)

            graph.replay = replay
            self.graphs[key] = graph
            return graph
        groups = run.optimizer.param_groups
        _make_capturable(run.optimizer)
        if self.lrs is None:
            self.lrs = [
                torch.tensor(float(g["lr"]), dtype=torch.float32, device=run.accelerator.device) for g in groups
            ]
            self.filled = [float(g["lr"]) for g in groups]
        floats = [g["lr"] for g in groups]
        graph = torch.cuda.CUDAGraph()
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        try:
            for g, t in zip(groups, self.lrs):
                g["lr"] = t  # recorded: the optimizer reads the tensor at every replay
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                losses, grad_norm = self._body(inputs)
        except Exception as e:  # noqa: BLE001
            # a failed capture leaves CUDA's random generator mid-capture: eager steps cannot go on in this process
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoopError(
                f"cuda_graph_step could not record the training step at step {run.state.global_step + 1} "
                f"({first}; a host sync or a recompilation inside the step does this); set cuda_graph_step false"
            ) from None
        finally:
            for g, f in zip(groups, floats):
                g["lr"] = f
        main.wait_stream(self.stream)
        self.pool = graph.pool()
        self.graphs[key] = _Graph(inputs, losses, grad_norm, graph.replay)
        return self.graphs[key]


def _make_capturable(optimizer):
    """Let a torch Adam-family optimizer step inside a graph: `capturable`, with its step counts on the device."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)
