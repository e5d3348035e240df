"""transformers' TrainerCallbacks on the loop (loop/trainer_callbacks.py): the same events at the same points with the
same TrainerState and TrainerControl as under Trainer, control obeyed, and the same numbers (CPU, fp32)."""

import pytest
from helpers import LMData, LossLoggingCallback, assert_same, clone, tiny_gpt2
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

import loop

EVENTS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_prediction_step",
    "on_evaluate",
    "on_save",
    "on_epoch_end",
    "on_train_end",
)


class Recorder(TrainerCallback):
    """Every event with the step, the epoch and the control flags it saw; stops through control at `stop_at`."""

    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def __getattribute__(self, name):
        if name in EVENTS:

            def record(args, state, control, **kwargs):
                flags = (
                    control.should_log,
                    control.should_evaluate,
                    control.should_save,
                    control.should_epoch_stop,
                    control.should_training_stop,
                )
                extra = sorted(
                    k
                    for k in kwargs.get("logs", kwargs.get("metrics", {}))
                    if not k.endswith(("_runtime", "_per_second")) and not k.startswith("loop/")
                )
                self.seen.append((name, state.global_step, round(state.epoch or 0, 6), flags, tuple(extra)))
                if name == "on_step_end" and state.global_step == self.stop_at:
                    control.should_training_stop = True

            return record
        return super().__getattribute__(name)


def _args(tmp_path, name, **kw):
    base = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        learning_rate=1e-2,
        num_train_epochs=2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        per_device_eval_batch_size=5,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
    )
    return TrainingArguments(**{**base, **kw})


def _both(tmp_path, make_callbacks, **kw):
    model, train, evals = tiny_gpt2(), LMData(40), LMData(9, seed=1)
    theirs, ours = make_callbacks(), make_callbacks()
    trainer = Trainer(
        model=clone(model),
        args=_args(tmp_path, "trainer", **kw),
        train_dataset=train,
        eval_dataset=evals,
        callbacks=theirs,
    )
    trainer.train()
    config = loop.TrainConfig.from_training_arguments(_args(tmp_path, "loop", **kw))
    result = loop.train(config, clone(model), train, eval_dataset=evals, callbacks=ours)
    return trainer, theirs, result, ours


@pytest.mark.parametrize("stop_at", [None, 5])
def test_every_event_in_trainers_order_with_its_state_and_control(tmp_path, stop_at):
    """Accumulation 3 with a short last window, logging, evaluation and checkpoints on steps, two epochs; and a run a
    callback stops through control.should_training_stop at step 5."""
    trainer, (theirs,), result, (ours,) = _both(tmp_path, lambda: [Recorder(stop_at)])
    assert [e[0] for e in ours.seen] == [e[0] for e in theirs.seen]
    assert ours.seen == theirs.seen
    assert_same(trainer.state.log_history, result.log_history)
    if stop_at:
        assert result.global_step == trainer.state.global_step == stop_at


def test_a_callback_reading_the_state_sees_trainers_numbers(tmp_path):
    trainer, (theirs,), result, (ours,) = _both(tmp_path, lambda: [LossLoggingCallback()])
    assert ours.losses == theirs.losses and len(ours.losses) > 3


def test_transformers_early_stopping_callback_stops_where_it_stops_trainer(tmp_path):
    make = lambda: [EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)]  # noqa: E731
    trainer, _, result, _ = _both(tmp_path, make, load_best_model_at_end=True, metric_for_best_model="loss")
    assert trainer.state.global_step < 20 and result.global_step == trainer.state.global_step
    assert_same(trainer.state.log_history, result.log_history)


def test_a_callback_class_is_taken_as_trainer_takes_it_and_a_wrong_object_is_refused(tmp_path):
    config = loop.TrainConfig.from_training_arguments(_args(tmp_path, "loop", max_steps=2))
    result = loop.train(config, tiny_gpt2(), LMData(16), eval_dataset=LMData(4), callbacks=[LossLoggingCallback])
    assert result.global_step == 2
    with pytest.raises(loop.LoopError, match="neither a loop.Callback nor a transformers TrainerCallback"):
        loop.train(config, tiny_gpt2(), LMData(16), eval_dataset=LMData(4), callbacks=[object()])


def test_a_stateful_trainer_callback_is_checkpointed_and_restored_on_resume(tmp_path):
    """EarlyStoppingCallback is an ExportableState: its patience counter travels in the checkpoint, so a resumed run
    stops at the step the uninterrupted run stops at."""

    def run(name, resume=None):
        args = _args(
            tmp_path,
            name,
            max_steps=12,
            eval_steps=2,
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            num_train_epochs=3,
        )
        config = loop.TrainConfig.from_training_arguments(args)
        stopper = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=10.0)
        result = loop.train(
            config,
            tiny_gpt2(),
            LMData(40),
            eval_dataset=LMData(9, seed=1),
            callbacks=[stopper],
            resume_from_checkpoint=resume,
        )
        return result, stopper

    whole, stopper = run("whole")
    assert whole.global_step == 8 and stopper.early_stopping_patience_counter == 3  # best at 2, no gain at 4, 6, 8
    resumed, stopper = run("whole-copy", resume=str(tmp_path / "whole" / "checkpoint-6"))
    assert resumed.global_step == 8 and stopper.early_stopping_patience_counter == 3
