"""The optimizer sharded over the data-parallel ranks, ZeRO-1 style (`sharded_optimizer: true`, DDP only).

Why. Under DDP every rank all-reduces every gradient after the backward and keeps and steps the whole optimizer state
(AdamW: two fp32 copies of the model). Here each rank receives only its shard of the summed gradients, while the
backward is still running, steps the optimizer on that shard alone, and hands the updated shard to the others.

How, in the order a step runs:
  * Buckets (made once): the trainable parameters, last registered first (about the order the backward finishes
    them), grouped by optimizer param group into buckets of about `ddp_bucket_cap_mb`, each bucket's flat length
    padded to a multiple of the world size R. Each fp32 parameter's .grad is a view of its bucket's flat buffer, so
    the backward accumulates there. Rank r owns slice r of every bucket: an fp32 copy of those elements (the
    "shard") is what the rank's optimizer steps, with the run's optimizer class and each group's settings.
  * Backward: micro-batches before a window's last accumulate their gradients locally (DDP's no_sync: nothing is
    sent). In the last one, a hook after each parameter's gradient is complete counts its bucket's ready parameters;
    when a bucket is complete its buffer is divided by R (DDP's average) and reduce-scattered without waiting
    (`reduce_scatter_tensor(async_op=True)`), while the backward goes on. A bucket with parameters that got no
    gradient is sent, with zeros for them, when the backward is done. Under torch_compile the backward is one graph
    whose gradients all arrive at its end, unless ddp_compile_overlap splits it at DDP's buckets (the model then stays
    in DDP's wrapper, whose own communication is switched off): then each piece's buckets go out as it finishes.
    `grad_reduce_dtype: bf16` sends the buffers in bf16 (half the bytes; the numbers change, so it is its own field).
  * Clip (`clip_`): wait for the reductions; the grad norm is the square root of the shards' summed squares over the
    ranks (one all-reduce of a scalar), as clip_grad_norm_ over the whole gradients gives; the shards are scaled by
    Trainer's clip coefficient.
  * Step: the optimizer steps the shards; each bucket's updated shards are all-gathered into the parameters. Then
    zero_grad zeroes the buffers (the parameters' .grad stay views of them).
Memory a rank: the optimizer state of 1/R of the model, and the gradients once, in the buckets. DDP's wrapper, whose
reducer holds buckets of its own, is dropped after its constructor has broadcast rank 0's weights
(fit.ddp_wrapper_unneeded says when: not for a model with buffers, which DDP broadcasts before forwards, nor for a
compiled model split at DDP's buckets).
  * Checkpoints: each rank writes its optimizer state (`optimizer_shard_<rank>.pt`, with the bucket layout); resume
    needs the same world size and parameters, and refuses in one line otherwise.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from .errors import LoopError

REDUCE_DTYPES = {"bf16": torch.bfloat16}
# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only the old names
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Bucket:
    def __init__(self, params, group: int, world: int, rank: int):
        self.params, self.group = params, group  # group: the index of the optimizer param group it belongs to
        self.numels = [p.numel() for p in params]
        total = sum(self.numels)
        self.shard_len = -(-total // world)
        self.size = self.shard_len * world
        self.start = rank * self.shard_len
        device = params[0].device
        self.buffer = torch.zeros(self.size, dtype=torch.float32, device=device)  # the gradients, flat
        self.shard = torch.zeros(self.shard_len, dtype=torch.float32, device=device)  # what the optimizer steps
        self.grad = torch.zeros(self.shard_len, dtype=torch.float32, device=device)  # its slice of the summed grads
        self.shard.grad = self.grad
        self.ready = 0
        self.work = self.received = None

    def parts(self):
        """(parameter, its slice of the flat buffer)."""
        offset = 0
        for p, n in zip(self.params, self.numels):
            yield p, self.buffer[offset : offset + n]
            offset += n

    def read_params(self):
        """The rank's shard from the parameters (at the start, and after a checkpoint's weights are loaded)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            end = min(self.start + self.shard_len, flat.numel())
            self.shard.zero_()
            if end > self.start:
                self.shard[: end - self.start].copy_(flat[self.start : end])

    def zero_grad(self):
        """Zero the buffer and make each fp32 parameter's .grad a view of its slice: the backward accumulates into
        the buffer itself (no copy before sending, no gradient tensors of its own)."""
        self.buffer.zero_()
        for p, part in self.parts():
            if p.dtype == torch.float32:
                p.grad = part.view_as(p)
            else:
                p.grad = None


class ShardedOptimizer:
    """The buckets, their hooks and collectives; `.optimizer` is the rank's optimizer over its shards: the class of
    the run's optimizer (a subclass whose step also gathers), each group's settings, the rank's shards as params."""

    def __init__(self, model, optimizer, reduce_dtype: str | None, bucket_mb: float, group=None):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.reduce_dtype = REDUCE_DTYPES.get(reduce_dtype) if reduce_dtype else None
        self.reducing = False  # True during a window's last backward: the hooks send the gradients
        self.kept_ddp = None  # DDP's wrapper, where the run keeps it (fit.ddp_wrapper_unneeded)
        owner = {}
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                owner[p] = gi
        cap = max(1, int(bucket_mb * 2**20 / 4))  # elements of fp32
        self.buckets = []
        trainable = [p for p in model.parameters() if p.requires_grad]
        missing = [p for p in trainable if p not in owner]
        if missing:
            raise LoopError(
                f"sharded_optimizer: {len(missing)} trainable parameters are in no optimizer group; give the "
                "optimizer every trainable parameter or set sharded_optimizer false"
            )
        for gi in range(len(optimizer.param_groups)):
            params = [p for p in reversed(trainable) if owner[p] == gi]  # about the order the backward ends them
            current, size = [], 0
            for p in params:
                current.append(p)
                size += p.numel()
                if size >= cap:
                    self.buckets.append(_Bucket(current, gi, self.world, self.rank))
                    current, size = [], 0
            if current:
                self.buckets.append(_Bucket(current, gi, self.world, self.rank))
        self.of = {p: b for b in self.buckets for p in b.params}
        for b in self.buckets:
            b.read_params()
            b.zero_grad()
        self.handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.of]
        groups = []
        for gi, g in enumerate(optimizer.param_groups):
            shards = [b.shard for b in self.buckets if b.group == gi]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": shards})
        cls = type(optimizer)
        sharded_cls = type(f"Sharded{cls.__name__}", (cls,), {"step": _sharded_step})
        takes = inspect.signature(cls.__init__).parameters  # defaults may hold keys the constructor does not take
        self.optimizer = sharded_cls(groups, **{k: v for k, v in optimizer.defaults.items() if k in takes})
        self.optimizer._loop_shards = self

    # ---------------------------------------------------------------- backward
    def _grad_ready(self, p):
        if not self.reducing:
            return
        b = self.of[p]
        b.ready += 1
        if b.ready == len(b.params):
            self._send(b)

    def _send(self, b):
        with torch.no_grad():
            for p, part in b.parts():  # gradients the backward did not accumulate into the buffer itself
                if p.grad is None:
                    part.zero_()
                elif p.grad.data_ptr() != part.data_ptr():
                    part.copy_(p.grad.reshape(-1))
            b.buffer.div_(self.world)  # DDP's average, before the sum
            send = b.buffer if self.reduce_dtype is None else b.buffer.to(self.reduce_dtype)
            b.received = b.grad if self.reduce_dtype is None else torch.empty_like(b.grad, dtype=self.reduce_dtype)
            b.work = _reduce_scatter(b.received, send, group=self.group, async_op=True)

    def wait(self):
        """Every bucket's reduced shard in place (buckets the hooks did not send are sent now)."""
        for b in self.buckets:
            if b.work is None:
                self._send(b)
        for b in self.buckets:
            b.work.wait()
            if b.received is not b.grad:
                b.grad.copy_(b.received)
            b.work = b.received = None
            b.ready = 0
        self.reducing = False

    # ---------------------------------------------------------------- clip, step
    def clip_(self, max_norm: float) -> torch.Tensor:
        """The pre-clip norm of the whole (averaged) gradient; scales the shards to max_norm as clip_grad_norm_."""
        self.wait()
        squares = torch.stack([b.grad.pow(2).sum() for b in self.buckets]).sum()  # fp32 shards
        dist.all_reduce(squares, group=self.group)
        norm = squares.sqrt()
        if max_norm != float("inf"):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's clip_grad_norm_ coefficient
            for b in self.buckets:
                b.grad.mul_(coef)
        return norm

    def gather(self):
        """The updated shards into every rank's parameters (through one bucket-sized buffer at a time: the gradients
        stay readable until zero_grad, as without sharding)."""
        with torch.no_grad():
            for b in self.buckets:
                gathered = torch.empty_like(b.buffer)
                _all_gather(gathered, b.shard, group=self.group)
                offset = 0
                for p, n in zip(b.params, b.numels):
                    p.copy_(gathered[offset : offset + n].view_as(p))
                    offset += n

    def zero_grad(self):
        """After the step, in place of model.zero_grad(): the buffers zeroed, the parameters' .grad views again."""
        for b in self.buckets:
            b.zero_grad()

    def remove(self):
        """After the run: the hooks off the caller's parameters, and their .grad no longer views of the buckets."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.of:
            p.grad = None

    # ---------------------------------------------------------------- checkpoints
    def layout(self) -> dict:
        return {"world_size": self.world, "buckets": [[list(p.shape) for p in b.params] for b in self.buckets]}

    def state_dict(self) -> dict:
        return {"layout": self.layout(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, where: str):
        if state.get("layout") != self.layout():
            saved = state.get("layout", {}).get("world_size")
            raise LoopError(
                f"{where} holds an optimizer sharded over {saved} processes with another bucket layout; this run has "
                f"{self.world} processes: resume with the same number of processes, parameters and ddp_bucket_cap_mb"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        for b in self.buckets:  # the weights were loaded into the parameters: the shards follow them
            b.read_params()


def _sharded_step(self, closure=None):
    """The run's optimizer over the rank's shards, then the shards gathered into every rank's parameters."""
    loss = super(type(self), self).step(closure)
    self._loop_shards.gather()
    return loss


def bf16_allreduce_hook(group, bucket):
    """DDP's bucket all-reduced in bf16 (grad_reduce_dtype bf16 without the sharded optimizer): torch's
    bf16_compress_hook, which refuses any backend but NCCL, for every backend."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def back(fut):
        return buffer.copy_(fut.value()[0])

    return future.then(back)


def file_name(rank: int) -> str:
    return f"optimizer_shard_{rank}.pt"


__all__ = ["ShardedOptimizer", "bf16_allreduce_hook", "file_name", "REDUCE_DTYPES"]
