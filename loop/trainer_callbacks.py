"""transformers' `TrainerCallback`s on the loop: the callbacks written for Trainer (your own, transformers'
EarlyStoppingCallback, TRL's, PEFT's) run unchanged, with Trainer's events at Trainer's points, a `TrainerState` kept
as Trainer keeps it and a `TrainerControl` that the loop obeys.

`TrainerCallbacks` is one loop.Callback holding transformers' own CallbackHandler (with its DefaultFlowCallback, as
Trainer has it): every loop event is handed to the handler with (args, state, control, **kwargs), as Trainer calls it.
The handler's control is the run's (`run.control`), and the loop reads it where Trainer does:

  * after on_step_end: should_log / should_evaluate / should_save (the DefaultFlowCallback's schedule, which is the
    loop's own, or a callback's request) decide the step's log, evaluation and save;
  * after on_epoch_end: the same for the epoch's end;
  * should_training_stop ends the run after the step (on_train_begin: before the first), should_epoch_stop the epoch.

`args` is what the callbacks read as `args`: the TrainingArguments a loop.Trainer was made with, or the run's
TrainConfig (it has TrainingArguments' field names). Callback state that is an `ExportableState` is saved in every
checkpoint and restored on resume. Nothing here reads the device: the state's numbers are the loop's host-side ones.
"""

from __future__ import annotations

from . import trainer_format
from .callbacks import STEP_EVENTS, STOP, Callback


def is_trainer_callback(cb) -> bool:
    from transformers import TrainerCallback

    return isinstance(cb, TrainerCallback) or (isinstance(cb, type) and issubclass(cb, TrainerCallback))


class TrainerCallbacks(Callback):
    """The run's TrainerCallbacks (instances or classes, as Trainer takes them), behind one loop.Callback."""

    def __init__(self, callbacks, args=None, state=None, control=None):
        from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState

        self._bound = None  # the run whose fixed values the state holds (bind)

        self.args = args
        self.handler = CallbackHandler([DefaultFlowCallback, *callbacks], None, None, None, None)
        self.state = state if state is not None else TrainerState()
        self.control = control if control is not None else TrainerControl()

    @property
    def listens_inside_the_step(self) -> bool:
        from transformers import TrainerCallback

        return any(
            getattr(type(cb), e) is not getattr(TrainerCallback, e)
            for cb in self.handler.callbacks
            for e in STEP_EVENTS
        )

    # ------------------------------------------------------------------ the state, as Trainer keeps it
    def bind(self, run):
        """What stays fixed for the run (its length, batch, ranks, objects): taken once, at its first event."""
        s, h, acc = self.state, self.handler, run.accelerator
        s.max_steps, s.num_train_epochs = run.state.max_steps, run.plan.num_epochs
        trainer_format.set_steps(s, run.plan)
        s.train_batch_size = run.config.per_device_train_batch_size  # Trainer's args.train_batch_size (no DataParallel)
        s.is_world_process_zero, s.is_local_process_zero = acc.is_main_process, acc.is_local_main_process
        s.trial_params, s.trial_name = getattr(run, "trial_params", None), getattr(run, "trial_name", None)
        s.is_hyper_param_search = s.trial_params is not None
        h.model, h.optimizer, h.lr_scheduler = run.unwrapped, run.optimizer, run.scheduler
        h.train_dataloader, h.eval_dataloader = run.loader, run.evaluator
        run.control = self.control
        self._bound = run

    def sync(self, run):
        """TrainerState from the loop's TrainState as it is now (host values only: no device sync)."""
        if self._bound is not run:
            self.bind(run)
        s, t = self.state, run.state
        s.global_step, s.epoch = t.global_step, t.epoch
        s.log_history = t.log_history  # the same records, appended as they are made
        s.best_metric, s.best_global_step, s.best_model_checkpoint = (
            t.best_metric,
            t.best_global_step,
            t.best_checkpoint,
        )
        s.total_flos, s.num_input_tokens_seen = t.total_flos, t.num_input_tokens_seen
        self.handler.eval_dataloader = run.evaluating or run.evaluator  # the set being evaluated, as Trainer sets it

    def event(self, name, run, **kwargs):
        self.sync(run)
        self.control = getattr(self.handler, name)(
            self.args if self.args is not None else run.config, self.state, self.control, **kwargs
        )
        run.control = self.control
        return STOP if self.control.should_training_stop else None

    # ------------------------------------------------------------------ the loop's events, handed over
    def on_train_begin(self, run):
        return self.event("on_train_begin", run)

    def on_epoch_begin(self, run):
        return self.event("on_epoch_begin", run)

    def on_step_begin(self, run):
        return self.event("on_step_begin", run)

    def on_substep_end(self, run):
        return self.event("on_substep_end", run)

    def on_pre_optimizer_step(self, run):
        return self.event("on_pre_optimizer_step", run)

    def on_optimizer_step(self, run):
        return self.event("on_optimizer_step", run)

    def on_step_end(self, run):
        return self.event("on_step_end", run)

    def on_log(self, run, record):
        logs = {k: v for k, v in record.items() if k != "step"}  # Trainer's log() hands the record without its step
        return self.event("on_log", run, logs=logs)

    def on_prediction_step(self, run):
        return self.event("on_prediction_step", run)

    def on_evaluate(self, run, metrics):
        return self.event("on_evaluate", run, metrics=metrics)

    def on_save(self, run, path):
        return self.event("on_save", run)

    def on_epoch_end(self, run):
        return self.event("on_epoch_end", run)

    def on_train_end(self, run):
        return self.event("on_train_end", run)

    # ------------------------------------------------------------------ stateful callbacks (ExportableState)
    def state_dict(self):
        """Trainer's `stateful_callbacks`: each ExportableState callback's state by class name (a list for several of
        one class), and the TrainerControl's."""
        from transformers.trainer_callback import ExportableState

        saved = {}
        for cb in [*self.handler.callbacks, self.control]:
            if isinstance(cb, ExportableState):
                name, state = type(cb).__name__, cb.state()
                if name not in saved:
                    saved[name] = state
                else:
                    saved[name] = [*(saved[name] if isinstance(saved[name], list) else [saved[name]]), state]
        return saved

    def load_state_dict(self, saved):
        """Trainer's _load_callback_state: the saved values set on the callbacks of the same class, in order; a saved
        callback the run does not have is named in Trainer's warning (on transformers.trainer's logger)."""
        seen = {}
        for cb in [*self.handler.callbacks, self.control]:
            name = type(cb).__name__
            got = saved.get(name)
            if isinstance(got, list):
                got = got[seen.get(name, 0)] if seen.get(name, 0) < len(got) else None
            seen[name] = seen.get(name, 0) + 1
            if got is not None:
                for key, value in {**got.get("args", {}), **got.get("attributes", {})}.items():
                    setattr(cb, key, value)
        not_found = [name for name in saved if name not in seen]
        if not_found:
            from transformers.trainer import logger

            logger.warning(
                "Checkpoint included callbacks not included in current configuration. Ignoring. "
                f"({', '.join(not_found)})"
            )


def split(callbacks, args=None):
    """(loop callbacks, TrainerCallbacks adapter or None): the TrainerCallbacks of `callbacks` behind one adapter."""
    ours = [cb for cb in callbacks if not is_trainer_callback(cb)]
    theirs = [cb for cb in callbacks if is_trainer_callback(cb)]
    return ours, (TrainerCallbacks(theirs, args) if theirs else None)
