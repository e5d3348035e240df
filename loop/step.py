"""One optimizer step over one gradient-accumulation window, with Trainer's semantics.

Gradient-accumulation maths, spelled out once. A window holds W micro-batches (W = gradient_accumulation_steps,
fewer in the last window of an epoch). The quantity we differentiate is

    L = sum_{micro-batches m} sum_{target items i in m} loss_i  /  N,     N = target items in the whole window,
                                                                           summed over all ranks,

i.e. the mean over every target token of the global batch, however the tokens are spread over micro-batches and
ranks. A model that takes `num_items_in_batch` (every transformers model) returns sum_i loss_i / N for its
micro-batch; DDP averages gradients over R ranks, so each rank multiplies its loss by R to undo that average.
A model that cannot take the count returns a per-micro-batch mean; we divide it by W, as Trainer does.
For causal LMs the labels are shifted inside the model, so position 0 is never a target: N counts labels[..., 1:].
A compute_loss_func(outputs, labels, num_items_in_batch) is handed N and treated like such a model (Trainer's rule);
one without the num_items_in_batch parameter returns a per-batch mean and is divided by W, like a plain model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch

from .callbacks import fire
from .errors import LoopError
from .optim import current_lr, group_lrs, is_plateau

IGNORE_INDEX = -100


def count_target_items(window, shifts_labels: bool):
    """Target items (labels != -100) in a window, as a device tensor; None if the batches carry no labels."""
    if not window or not isinstance(window[0], Mapping) or "labels" not in window[0]:
        return None
    try:
        return sum(
            (b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] if shifts_labels else b["labels"])
            .ne(IGNORE_INDEX)
            .sum()
            for b in window
        )
    except (TypeError, AttributeError):
        return None


def window_item_count(run, window, across_ranks=True):
    """N for the window, summed over ranks (a collective, not a host sync). Counted, as Trainer counts it, when the
    model takes `num_items_in_batch` or a compute_loss_func will receive it."""
    n = count_target_items(window, run.shifts_labels) if run.accepts_loss_kwargs or run.compute_loss_func else None
    if (
        n is not None
        and across_ranks
        and run.config.average_tokens_across_devices
        and run.accelerator.num_processes > 1
    ):
        n = run.accelerator.gather(n.to(run.accelerator.device)).sum()
    return n


def forward_loss(run, model, batch, num_items):
    """The micro-batch loss as Trainer's compute_loss returns it (not yet scaled for the window), and the outputs."""
    if run.compute_loss is not None:  # a Trainer subclass's compute_loss: its own forward and loss
        with run.attention():
            return run.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=num_items)
    labels = None
    if (run.label_smoother is not None or run.compute_loss_func is not None) and "labels" in batch:
        batch = dict(batch)
        labels = batch.pop("labels")  # the loss is computed outside the model
    if run.accepts_loss_kwargs and num_items is not None:
        batch = {**batch, "num_items_in_batch": num_items}
    with run.attention():
        outputs = model(**batch)
    if run.compute_loss_func is not None:
        loss = (
            run.compute_loss_func(outputs, labels, num_items_in_batch=num_items)
            if run.loss_func_takes_items
            else run.compute_loss_func(outputs, labels)
        )
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise LoopError(
                f"compute_loss_func returned {type(loss).__name__}"
                f"{tuple(loss.shape) if torch.is_tensor(loss) else ''}; it must return a scalar tensor"
            )
    elif labels is not None:
        loss = run.label_smoother(
            outputs, labels, shift_labels=run.smoothing_shifts_labels, num_items_in_batch=num_items
        )
    else:
        loss = (
            outputs.get("loss")
            if isinstance(outputs, Mapping)
            else outputs[0]
            if isinstance(outputs, (tuple, list))
            else None
        )
        # without a grad a loss cannot train (under no_grad, in evaluation, none is expected)
        if not torch.is_tensor(loss) or loss.dim() != 0 or not loss.requires_grad and torch.is_grad_enabled():
            got = ", ".join(outputs.keys()) if isinstance(outputs, Mapping) else f"a {type(outputs).__name__}"
            raise LoopError(
                f"the model returned no loss (got {got}); give the batch a `labels` column, make forward "
                "return the scalar loss first (a dict with 'loss', or a tuple), or pass compute_loss_func"
            )
    return loss, outputs


def window_share(run, loss, num_items, window_size: int) -> torch.Tensor:
    """The one rule that scales a micro-batch's loss so that the window's gradients, summed over its micro-batches and
    averaged by DDP over R ranks, are those of the whole window's mean (the module docstring's L):
      * normalised by N already (the model took num_items_in_batch, or a compute_loss_func that takes it): times R
        when N was counted over every rank (average_tokens_across_devices), undoing DDP's average;
      * otherwise a per-micro-batch mean: divided by W, as Trainer divides a subclass's loss.
    A Trainer subclass's compute_loss follows Trainer's rule for it: divided by W unless the model took N (or the
    subclass says `loss_is_scaled_for_ga`), never multiplied by R (Trainer's own compute_loss does that)."""
    if run.compute_loss is not None:
        scaled = getattr(run.compute_loss, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = run.accepts_loss_kwargs and num_items is not None
        return loss if scaled else loss / window_size
    counted = num_items is not None and (run.accepts_loss_kwargs or run.loss_func_takes_items)
    if counted and run.config.average_tokens_across_devices:
        loss = loss * run.accelerator.num_processes
    by_items = (run.accepts_loss_kwargs and num_items is not None) or run.loss_func_takes_items
    return loss if by_items else loss / window_size


# ------------------------------------------------------------------------------------------------------------------
# The pieces of one optimizer step. `optimizer_step` below puts them together; a custom step
# (loop.train(..., optimizer_step=fn)) can reuse them (docs/api.md's adversarial-training example does).


@contextlib.contextmanager
def grad_sync(run, sync: bool):
    """Backward passes inside reduce gradients across ranks only when `sync` (the window's last backward); the
    others accumulate locally under DDP's no_sync, unless accelerator_config's sync_each_batch asks for a reduction
    after every one (less memory, more traffic: Trainer's rule). accelerate's optimizer steps only when `sync`."""
    acc = run.accelerator
    acc.gradient_state._set_sync_gradients(sync)
    reduce_now = sync or acc.gradient_state.plugin_kwargs.get("sync_each_batch", False)
    if run.sharded is not None:  # DDP never reduces: the sharded optimizer's hooks reduce-scatter the last backward
        run.sharded.reducing = sync
        reduce_now = False
    with contextlib.nullcontext() if reduce_now else acc.no_sync(run.model):
        yield
    if sync and run.sharded is not None and run.sharded.kept_ddp is not None:
        # DDP's wrapper where it is kept (fit.ddp_wrapper_unneeded) runs under no_sync throughout, and a
        # no_sync forward tells DDP to skip the buffer broadcast before the next forward. Plain DDP broadcasts there
        # after a window's synchronised forward: set the flag that forward would have set.
        run.sharded.kept_ddp.require_forward_param_sync = True


def micro_batch_loss(run, batch, num_items, window_size: int) -> torch.Tensor:
    """The loss of one micro-batch, scaled so that the window's gradients sum to those of the whole-window mean."""
    loss, _ = forward_loss(run, run.model, batch, num_items)
    return window_share(run, loss, num_items, window_size)


def track_loss(run, loss: torch.Tensor, batch):
    """Add a micro-batch loss to the running sum logged at the next record (on device: no sync)."""
    loss = loss.detach()
    finite = torch.isfinite(loss)  # one flag for both: the watch, before the nan filter hides the value, and the filter
    run.note_nonfinite(loss, finite)
    if run.config.logging_nan_inf_filter:  # a nan/inf micro-batch counts as the running average, decided on device
        loss = torch.where(finite, loss, run.tr_loss / (1 + run.state.global_step - run.state.last_logged_step))
    run.tr_loss += loss
    run.count_batch(batch)


def clip_and_step(run, events: bool = False) -> torch.Tensor:
    """Clip and step the optimizer; returns the pre-clip grad norm. Device work only (a CUDA graph can hold it); with
    `events` (the eager step), the callbacks' on_pre_optimizer_step and on_optimizer_step around optimizer.step()."""
    cfg = run.config
    # accelerate unscales fp16 gradients before measuring; the pre-clip norm is returned (inf: measure only)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    if run.sharded is not None:  # the norm over every rank's shard of the reduced gradients
        grad_norm = run.sharded.clip_(max_norm)
    else:
        grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    if events:
        fire(run.callbacks, "on_pre_optimizer_step", run)
    run.optimizer.step()  # a no-op on an fp16 overflow: the scaler skips it
    if events:
        fire(run.callbacks, "on_optimizer_step", run)
    return grad_norm


def finish_step(run, grad_norm):
    """After the optimizer stepped: watch the grad norm, note the lr, step the schedule and the EMA, zero the grads."""
    run.note_nonfinite(grad_norm)
    run.last_lr = current_lr(run.scheduler, run.optimizer)  # the lr this step used, as Trainer logs it
    if run.group_names:
        run.last_group_lrs = group_lrs(run.scheduler, run.optimizer)
    if not run.accelerator.optimizer_step_was_skipped:
        if not is_plateau(run.scheduler):  # ReduceLROnPlateau steps on the eval metric instead
            run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.model, run.state.global_step + 1)
    if run.sharded is not None:  # the gradients live in its buckets: zeroed there, not set to None
        run.sharded.zero_grad()
    else:
        run.model.zero_grad()


def apply_gradients(run) -> torch.Tensor:
    """Clip, step the optimizer, the schedule and the EMA, zero the gradients. Returns the pre-clip grad norm."""
    grad_norm = clip_and_step(run, events=True)
    finish_step(run, grad_norm)
    return grad_norm


def forward_backward(run, window) -> list[torch.Tensor]:
    """Forward and backward every micro-batch of `window`; returns their scaled losses (detached, on device)."""
    num_items = window_item_count(run, window)
    losses = []
    run.window_size = len(window)
    for i, batch in enumerate(window):
        with grad_sync(run, sync=i == len(window) - 1):  # gradients are all-reduced on the last micro-batch only
            if run.training_step is not None:  # a Trainer subclass's training_step: forward, backward, its loss
                loss = run.training_step(run.model, batch, num_items)
            else:
                loss = micro_batch_loss(run, batch, num_items, len(window))
                run.accelerator.backward(loss)
        losses.append(loss.detach())
        if i < len(window) - 1:
            fire(run.callbacks, "on_substep_end", run)  # Trainer's event after each micro-batch but the last
    return losses


def optimizer_step(run, window) -> torch.Tensor:
    """Forward/backward every micro-batch of `window`, clip, step, schedule. Returns the grad norm (on device).

    The window's loss is added to run.tr_loss on device; nothing here waits for the device.
    """
    run.model.train()
    for loss, batch in zip(forward_backward(run, window), window):
        track_loss(run, loss, batch)
    return apply_gradients(run)
