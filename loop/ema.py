"""Exponential moving average of the weights (timm ModelEmaV3-style: fp32, foreach lerp, no host sync).

    e_0 = w_0;   after every real optimizer step t:  e_t = d_t * e_{t-1} + (1 - d_t) * w_t
    d_t = ema_decay, or min(ema_decay, (1 + t) / (10 + t)) with ema_warmup.
    Before ema_start_step the EMA simply tracks the weights (e_t = w_t).

A skipped fp16 step does not call update. Buffers (e.g. BatchNorm statistics) are copied, not averaged.

Under FSDP2 the parameters are DTensors holding this rank's shard: the EMA is made of the same DTensors, so each rank
keeps the EMA of its own shards (no full copy per GPU), lerps them locally, saves and loads them per rank
(`state_dict` holds the local shards), and the whole EMA exists only when it is gathered into the final model's ema/ folder.
"""

from __future__ import annotations

import contextlib

import torch

from .run import reshard


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    def __init__(self, model, decay: float, warmup: bool = False, start_step: int = 0, device=None):
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        params = _params(model)
        self.device = torch.device(device) if device is not None else params[0].device
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in params]
        self.sharded = any(_is_dtensor(t) for t in self.shadow)  # FSDP2: per-rank shards

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model, step: int):
        """Fold the current weights in after optimizer step number `step` (1-based)."""
        if self.sharded:
            reshard(model)
        weights = [p.detach() for p in _params(model)]
        if self.device != weights[0].device or weights[0].dtype != torch.float32:
            weights = [w.to(self.device, torch.float32) for w in weights]
        if step <= self.start_step:
            torch._foreach_copy_(self.shadow, weights)
            return
        # e += (1 - d) * (w - e)  ==  d * e + (1 - d) * w, in one fused kernel per tensor list
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay_at(step))

    @torch.no_grad()
    def swap(self, model):
        """Exchange the model's weights with the EMA in place, one tensor at a time (call again to swap back)."""
        if self.sharded:
            reshard(model)
        for p, e in zip(_params(model), self.shadow):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self, model):
        """The EMA weights in the model for the length of the block, the trained ones back after it, also when the
        block raises (a compute_metrics that fails during the EMA evaluation must not leave the EMA in the model)."""
        self.swap(model)
        try:
            yield
        finally:
            self.swap(model)

    def state_dict(self):
        """Whole tensors (not sharded), or under FSDP2 this rank's shards: what one file per rank holds."""
        return {f"ema.{i}": _local(t) for i, t in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state):
        for i, t in enumerate(self.shadow):
            got = state[f"ema.{i}"]
            _local(t).copy_(got.to(_local(t).device))

    def named_weights(self, model):
        """{name: ema tensor} under the model's own parameter names, for saving."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dict(zip(names, self.shadow))


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _local(t):
    return t.to_local() if _is_dtensor(t) else t
