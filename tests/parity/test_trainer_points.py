"""Trainer's other extension points and arguments on loop.Trainer, number for number against Trainer (CPU, fp32):
get_*_dataloader overrides, a patched _evaluate, auto_find_batch_size, the greedy scheduler, and resuming sharded
weights or a checkpoint written under other batch settings."""

import json
import logging
import os

import torch
import transformers
from helpers import LMData, assert_same, tiny_gpt2, trainer_args
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.testing_utils import CaptureLogger, LoggingLevel

import loop


def _args(tmp_path, name, **kw):
    return trainer_args(tmp_path / name, **{"max_steps": 6, "eval_steps": 3, **kw})


def _both(tmp_path, make, **kw):
    """The same Trainer code, made by make(Base, args) and trained with transformers.Trainer, then loop.Trainer."""
    trained = []
    for Base in (transformers.Trainer, loop.Trainer):
        trainer = make(Base, _args(tmp_path, Base.__module__, **kw))
        trainer.train()
        trained.append(trainer)
    return trained


def _same_run(theirs, ours):
    assert_same(theirs.state.log_history, ours.state.log_history)
    for a, b in zip(theirs.model.state_dict().values(), ours.model.state_dict().values()):
        assert torch.equal(a, b)


class TwiceOver:
    """An iterable of batches without a .dataset (what a custom get_*_dataloader may return)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return sum(len(x) for x in self.loaders)

    def __iter__(self):
        for x in self.loaders:
            yield from x


def test_dataloader_overrides_are_what_is_trained_and_evaluated_on(tmp_path):
    def make(Base, args):
        class Twice(Base):  # each epoch and each evaluation goes over the data twice
            def get_train_dataloader(self):
                return TwiceOver([super().get_train_dataloader(), super().get_train_dataloader()])

            def get_eval_dataloader(self, eval_dataset=None):
                return TwiceOver([super().get_eval_dataloader(eval_dataset), super().get_eval_dataloader(eval_dataset)])

        return Twice(model=tiny_gpt2(dropout=0.1), args=args, train_dataset=LMData(24), eval_dataset=LMData(9, seed=1))

    theirs, ours = _both(tmp_path, make, max_steps=-1, num_train_epochs=2)
    _same_run(theirs, ours)
    assert ours.state.max_steps == 2 * (2 * 24 // 4) // 2  # twice the batches an epoch, accumulation 2
    assert ours.evaluate()["eval_loss"] == theirs.evaluate()["eval_loss"]  # outside training too


def test_a_patched_evaluate_decides_the_best_checkpoint_as_in_trainer(tmp_path):
    """Evaluation each epoch, a checkpoint each step: the best step's checkpoint was saved before the evaluation
    that found it, and Trainer records it at the next save."""
    metrics = [{"eval_loss": 0.5}, {"eval_loss": 0.7}, {"eval_loss": 0.6}]

    def make(Base, args):
        trainer = Base(model=tiny_gpt2(), args=args, train_dataset=LMData(16), eval_dataset=LMData(9, seed=1))
        results = iter(metrics)
        trainer._evaluate = lambda *a, **k: dict(next(results))  # Trainer's own tests patch it this way
        return trainer

    kw = dict(eval_strategy="epoch", save_strategy="steps", save_steps=1, metric_for_best_model="loss")
    theirs, ours = _both(tmp_path, make, max_steps=-1, num_train_epochs=3, **kw)
    assert_same(theirs.state.log_history, ours.state.log_history)
    assert (ours.state.best_metric, ours.state.best_global_step) == (0.5, 2)
    assert ours.state.best_metric == theirs.state.best_metric
    assert ours.state.best_global_step == theirs.state.best_global_step
    assert os.path.basename(ours.state.best_model_checkpoint) == os.path.basename(theirs.state.best_model_checkpoint)


class OutOfMemoryAt(TrainerCallback):
    """Simulates a device running out of memory at batch sizes from `limit` up (accelerate's message)."""

    def __init__(self, limit):
        self.limit = limit

    def on_step_begin(self, args, state, control, **kwargs):  # before the step: the model and optimizer untouched
        if state.train_batch_size >= self.limit:
            raise RuntimeError("CUDA out of memory.")


def test_auto_find_batch_size_runs_again_with_a_smaller_batch_as_trainer(tmp_path):
    def make(Base, args):
        return Base(model=tiny_gpt2(), args=args, train_dataset=LMData(40), callbacks=[OutOfMemoryAt(16)])

    kw = dict(per_device_train_batch_size=16, auto_find_batch_size=True, eval_strategy="no", save_strategy="steps")
    theirs, ours = _both(tmp_path, make, save_steps=2, **kw)
    assert ours._train_batch_size == theirs._train_batch_size == 14  # int(16 * 0.9)
    _same_run(theirs, ours)
    state = json.load(open(tmp_path / "loop.trainer" / "checkpoint-2" / "trainer_state.json"))
    assert state["train_batch_size"] == 14
    # a new Trainer resumes at the batch size the checkpoint recorded (Trainer's rule with auto_find_batch_size)
    again = loop.Trainer(
        model=tiny_gpt2(), args=_args(tmp_path, "loop.trainer", save_steps=2, **kw), train_dataset=LMData(40)
    )
    assert again._train_batch_size == 16
    again.train(resume_from_checkpoint=str(tmp_path / "loop.trainer" / "checkpoint-2"))
    assert again._train_batch_size == 14
    assert_same(ours.state.log_history, again.state.log_history)


def test_greedy_scheduler_steps_on_the_eval_metric_as_in_trainer(tmp_path):
    def make(Base, args):
        return Base(model=tiny_gpt2(), args=args, train_dataset=LMData(24), eval_dataset=LMData(9, seed=1))

    kw = dict(lr_scheduler_type="greedy", lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, learning_rate=0.2)
    theirs, ours = _both(tmp_path, make, max_steps=12, eval_steps=2, **kw)
    _same_run(theirs, ours)
    assert len({r["learning_rate"] for r in ours.state.log_history if "learning_rate" in r}) > 1


def test_resume_from_resharded_weights_and_under_other_batch_settings(tmp_path):
    """A checkpoint whose weights were re-sharded after saving (an index and its shards) resumes exactly; one
    resumed with another batch size goes on with Trainer's warning, in Trainer's words."""

    def trainer(name, **kw):
        args = _args(tmp_path, name, save_strategy="steps", save_steps=3, eval_strategy="no", **kw)
        return loop.Trainer(model=tiny_gpt2(dropout=0.1), args=args, train_dataset=LMData(40))

    whole = trainer("run")
    whole.train()
    folder = tmp_path / "run" / "checkpoint-3"
    weights = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    shards = {name: f"model-{i + 1:05d}-of-{len(weights):05d}.safetensors" for i, name in enumerate(weights)}
    for name, shard in shards.items():
        save_file({name: weights[name]}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    resumed = trainer("run")
    resumed.train(resume_from_checkpoint=str(folder))
    _same_run(whole, resumed)

    trainer_utils = transformers.utils.logging.get_logger("transformers.trainer_utils")
    with LoggingLevel(logging.WARNING), CaptureLogger(trainer_utils) as warned:  # the suite runs at error level
        other = trainer("run", per_device_train_batch_size=8)
        other.train(resume_from_checkpoint=str(folder))
    assert "per_device_train_batch_size: 8 (from args) != 4 (from trainer_state.json)" in warned.out
    assert other.state.global_step == 6 and other._train_batch_size == 8


def test_output_dir_holds_what_trainer_writes_there(tmp_path):
    """Given TrainingArguments, nothing of the loop's own: no metrics.jsonl, no final model (Trainer's users call
    save_model()); the output_dir is made when the Trainer is, as Trainer makes it."""

    def make(Base, args):
        return Base(model=tiny_gpt2(), args=args, train_dataset=LMData(16), eval_dataset=LMData(9, seed=1))

    theirs, ours = _both(tmp_path, make, save_strategy="steps", save_steps=4)
    listing = [sorted(os.listdir(t.args.output_dir)) for t in (theirs, ours)]
    assert listing[0] == listing[1] == ["checkpoint-4", "checkpoint-6"]
    made = loop.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "made"))
    assert os.listdir(made.args.output_dir) == []
    # given a TrainConfig, what loop.train writes: the records and the final model too
    config = loop.TrainConfig(output_dir=str(tmp_path / "config"), use_cpu=True, max_steps=2, save_strategy="no")
    own = loop.Trainer(model=tiny_gpt2(), args=config, train_dataset=LMData(16))
    assert own._train_batch_size == config.per_device_train_batch_size
    own.train()
    assert {"metrics.jsonl", "model.safetensors"} <= set(os.listdir(config.output_dir))
