"""Exponential moving average of the weights (timm ModelEmaV3-style: fp32, foreach lerp, no host sync).

    e_0 = w_0;   after every real optimizer step t:  e_t = d_t * e_{t-1} + (1 - d_t) * w_t
    d_t = ema_decay, or min(ema_decay, (1 + t) / (10 + t)) with ema_warmup.
    Before ema_start_step the EMA simply tracks the weights (e_t = w_t).

A skipped fp16 step does not call update. Buffers (e.g. BatchNorm statistics) are copied, not averaged.
"""

from __future__ import annotations

import torch


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    def __init__(self, model, decay: float, warmup: bool = False, start_step: int = 0, device=None):
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        params = _params(model)
        self.device = torch.device(device) if device is not None else params[0].device
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in params]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model, step: int):
        """Fold the current weights in after optimizer step number `step` (1-based)."""
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
        for p, e in zip(_params(model), self.shadow):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)

    def state_dict(self):
        return {f"ema.{i}": t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state):
        for i, t in enumerate(self.shadow):
            t.copy_(state[f"ema.{i}"])

    def named_weights(self, model):
        """{name: ema tensor} under the model's own parameter names, for saving."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dict(zip(names, self.shadow))
