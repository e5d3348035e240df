"""A small event interface. A callback returns nothing, or "stop" to end training after the current step.

    class PrintLoss(loop.Callback):
        def on_log(self, run, record):
            if "loss" in record:
                print(run.state.global_step, record["loss"])

        def on_evaluate(self, run, metrics):
            if metrics["eval_loss"] < 0.5:
                return "stop"

`run` gives read access to `run.config`, `run.state` (a TrainState), `run.model`, `run.optimizer`,
`run.scheduler` and `run.accelerator`. A callback that defines `state_dict()`/`load_state_dict()` has its state
saved in every checkpoint and restored on resume.

The events are Trainer's, at Trainer's points: transformers' `TrainerCallback`s are served by the same dispatch
(trainer_callbacks.TrainerCallbacks adapts them, with a TrainerState and a TrainerControl that the loop obeys).
"""

from __future__ import annotations

STOP = "stop"


class Callback:
    def on_train_begin(self, run): ...
    def on_epoch_begin(self, run): ...
    def on_step_begin(self, run): ...  # before the first micro-batch of an accumulation window
    def on_substep_end(self, run): ...  # after each micro-batch's backward but the window's last (eager step only)
    def on_pre_optimizer_step(self, run): ...  # after clipping, before optimizer.step() (eager step only)
    def on_optimizer_step(self, run): ...  # after optimizer.step() (eager step only)
    def on_step_end(self, run): ...  # after every optimizer step, before logging/eval/save
    def on_log(self, run, record: dict): ...  # every record appended to log_history
    def on_prediction_step(self, run): ...  # after each evaluation batch
    def on_evaluate(self, run, metrics: dict): ...
    def on_save(self, run, path: str): ...  # a complete checkpoint now exists at `path`
    def on_epoch_end(self, run): ...
    def on_train_end(self, run): ...


STEP_EVENTS = ("on_substep_end", "on_pre_optimizer_step", "on_optimizer_step")  # fired inside the step itself


def fires_inside_the_step(callbacks) -> bool:
    """Whether a callback listens to an event inside the optimizer step (which a recorded CUDA graph cannot fire)."""
    for cb in callbacks:
        listens = getattr(cb, "listens_inside_the_step", None)  # an adapter answers for the callbacks it holds
        if listens is not None:
            if listens:
                return True
        elif any(getattr(type(cb), e, None) is not getattr(Callback, e) for e in STEP_EVENTS):
            return True
    return False


class EarlyStopping(Callback):
    """Stop when metric_for_best_model has not improved by more than `threshold` for `patience` evaluations.

    Trainer's EarlyStoppingCallback semantics: improvement is judged against the best value seen so far.
    """

    needs_metric = True  # refused before training when metric_for_best_model is unset

    def __init__(self, patience: int = 1, threshold: float = 0.0):
        self.patience, self.threshold, self.counter, self.best = patience, threshold, 0, None

    def on_evaluate(self, run, metrics):
        name = run.config.metric_for_best_model
        key = name if name.startswith("eval_") else f"eval_{name}"
        value = metrics.get(key)
        if value is None:
            return None
        better = (
            (lambda a, b: a > b + self.threshold)
            if run.config.greater_is_better
            else (lambda a, b: a < b - self.threshold)
        )
        if self.best is None or better(value, self.best):
            self.best, self.counter = value, 0
        else:
            self.counter += 1
        return STOP if self.counter >= self.patience else None

    def state_dict(self):
        return {"counter": self.counter, "best": self.best}

    def load_state_dict(self, state):
        self.counter, self.best = state["counter"], state["best"]


def fire(callbacks, event: str, run, *args) -> bool:
    """Call `event` on every callback; True if any asked to stop."""
    stop = False
    for cb in callbacks:
        stop = (getattr(cb, event)(run, *args) == STOP) or stop
    return stop
