"""`from loop import Trainer` in place of transformers' (loop/trainer.py): the same Trainer code, subclasses included,
gives Trainer's numbers on CPU in fp32, with gradient accumulation and evaluation."""

import os

import pytest
import torch
import transformers
from helpers import (
    ClsData,
    LMData,
    LossLoggingCallback,
    SimpleClassifier,
    assert_same,
    clone,
    cross_entropy_over_items,
    seeds,
    tiny_gpt2,
    trainer_args,
)

import loop


def _args(tmp_path, name, **kw):
    # a logits-only model names no label argument: without label_names Trainer would drop the column
    return trainer_args(tmp_path / name, **{"label_names": ["labels"], **kw})


def _run(tmp_path, Base, pick, model, train, evals, **kw):
    cls = Base if pick is None else seeds(Base)[pick]
    callback = LossLoggingCallback()
    name = "loop" if Base is loop.Trainer else "trainer"
    trainer = cls(
        model=clone(model),
        args=_args(tmp_path, name),
        train_dataset=train,
        eval_dataset=evals,
        callbacks=[callback],
        **kw,
    )
    output = trainer.train()
    return trainer, output, callback


@pytest.mark.parametrize(
    "pick,model,data,hooks",
    [
        (None, tiny_gpt2, LMData, {}),  # a plain Trainer: the loop's own step
        (0, SimpleClassifier, ClsData, {}),  # CustomTrainer.compute_loss on a logits-only model
        (1, tiny_gpt2, LMData, {}),  # EMATrainer: super().training_step, then its EMA
        (2, SimpleClassifier, ClsData, {"compute_loss_func": cross_entropy_over_items}),  # CustomOptimizerTrainer
        (3, tiny_gpt2, LMData, {}),  # CustomSchedulerTrainer.create_scheduler
    ],
    ids=["plain", "compute_loss", "training_step", "create_optimizer", "create_scheduler"],
)
def test_trainer_code_with_only_the_import_changed_logs_trainers_numbers(tmp_path, pick, model, data, hooks):
    model, train, evals = model(), data(40), data(9, seed=1)
    theirs, their_out, their_cb = _run(tmp_path, transformers.Trainer, pick, model, train, evals, **hooks)
    ours, our_out, our_cb = _run(tmp_path, loop.Trainer, pick, model, train, evals, **hooks)
    assert_same(theirs.state.log_history, ours.state.log_history)
    assert our_out.global_step == their_out.global_step == 8
    assert our_out.training_loss == their_out.training_loss
    assert our_cb.losses == their_cb.losses and len(our_cb.losses) >= 5
    if pick == 1:  # the subclass's own state, updated once per micro-batch on both sides
        assert all(torch.equal(theirs.ema[n], ours.ema[n]) for n in theirs.ema)
    # after training: evaluate and predict as Trainer's
    a, b = theirs.evaluate(), ours.evaluate()
    assert {k: v for k, v in a.items() if not k.endswith(("_runtime", "_per_second"))} == {
        k: v for k, v in b.items() if not k.endswith(("_runtime", "_per_second"))
    }
    pa, pb = theirs.predict(evals), ours.predict(evals)
    assert pa.metrics["test_loss"] == pb.metrics["test_loss"]


def test_what_loop_trainer_cannot_honour_is_refused_at_construction(tmp_path):
    class OwnPrediction(loop.Trainer):
        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            return None

    with pytest.raises(loop.LoopError, match="OwnPrediction overrides prediction_step, which loop.Trainer does not"):
        OwnPrediction(model=tiny_gpt2(), args=_args(tmp_path, "x"))
    with pytest.raises(loop.LoopError, match="push_to_hub"):
        loop.Trainer(model=tiny_gpt2(), args=_args(tmp_path, "y", push_to_hub=True, hub_model_id="me/x"))


def test_state_save_and_metrics_files_as_trainer_writes_them(tmp_path):
    import json

    trainer = loop.Trainer(
        model=tiny_gpt2(), args=_args(tmp_path, "loop"), train_dataset=LMData(40), eval_dataset=LMData(9, seed=1)
    )
    output = trainer.train()
    trainer.save_state()
    state = json.load(open(tmp_path / "loop" / "trainer_state.json"))
    assert state["global_step"] == 8 and state["log_history"] == trainer.state.log_history
    trainer.save_metrics("train", output.metrics)
    assert json.load(open(tmp_path / "loop" / "all_results.json"))["train_loss"] == output.training_loss
    trainer.save_model(str(tmp_path / "saved"))
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved") is not None


def test_a_dict_of_eval_sets_during_training_gives_trainers_records_and_best_checkpoint(tmp_path):
    """Each named set evaluated under eval_<name>_, one record and one on_evaluate each, the best checkpoint chosen on
    one of them; the run written into an output_dir a previous run used, as Trainer does."""
    model, train = tiny_gpt2(dropout=0.1), LMData(40)
    evals = {"near": LMData(9, seed=1), "far": LMData(6, seed=2, ragged=True)}
    kw = dict(save_strategy="steps", save_steps=4, metric_for_best_model="far_loss", load_best_model_at_end=True)
    runs = {}
    for Base in (transformers.Trainer, loop.Trainer):
        args = _args(tmp_path, "dict-" + Base.__module__, **kw)
        callback = LossLoggingCallback()
        for _ in range(2):  # the second run writes into the first one's output_dir
            trainer = Base(model=clone(model), args=args, train_dataset=train, eval_dataset=evals, callbacks=[callback])
            trainer.train()
        runs[Base] = trainer
    theirs, ours = runs[transformers.Trainer], runs[loop.Trainer]
    assert_same(theirs.state.log_history, ours.state.log_history)
    names = [k for r in ours.state.log_history for k in r if k.endswith("_loss") and k.startswith("eval_")]
    assert names == ["eval_near_loss", "eval_far_loss"] * 2
    assert ours.state.best_global_step == theirs.state.best_global_step
    assert ours.state.best_metric == theirs.state.best_metric
    assert all(torch.equal(a, b) for a, b in zip(theirs.model.state_dict().values(), ours.model.state_dict().values()))
    # given TrainingArguments, loop.Trainer writes what Trainer writes at the top of output_dir, nothing more (no
    # metrics.jsonl, no final model: Trainer's users call save_model())
    listing = {b: sorted(os.listdir(tmp_path / f"dict-{b.__module__}")) for b in runs}
    assert listing[loop.Trainer] == listing[transformers.Trainer] == ["checkpoint-4", "checkpoint-8"]


def test_a_subclass_log_override_sees_and_shapes_every_record_as_under_trainer(tmp_path):
    """Trainer subclasses (TRL's among them) override log() to add their own keys: every record (losses, evaluations,
    the final train metrics) goes through it, and what it hands to super().log() is what is recorded."""

    def logged(Base):
        class LogMore(Base):
            def log(self, logs, start_time=None):
                logs = {**logs, "records_so_far": len(self.state.log_history)}
                super().log(logs, start_time)

        trainer = LogMore(
            model=tiny_gpt2(), args=_args(tmp_path, Base.__module__), train_dataset=LMData(40), eval_dataset=LMData(9)
        )
        trainer.train()
        return trainer.state.log_history

    theirs, ours = logged(transformers.Trainer), logged(loop.Trainer)
    assert_same(theirs, ours)
    assert [r["records_so_far"] for r in ours] == list(range(len(ours))) and len(ours) > 8


def test_a_subclass_evaluate_override_is_every_evaluation_in_training_as_under_trainer(tmp_path):
    """A subclass's evaluate() runs at each evaluation in training; the metrics it returns choose the best checkpoint."""

    def run(Base):
        class EvalMore(Base):
            calls = 0

            def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
                type(self).calls += 1
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                return {**metrics, "eval_score": -metrics["eval_loss"] * (1 + self.state.global_step % 3)}

        args = _args(tmp_path, Base.__module__, eval_steps=2, save_strategy="steps", save_steps=2)
        args.metric_for_best_model, args.greater_is_better = "score", True
        trainer = EvalMore(model=tiny_gpt2(), args=args, train_dataset=LMData(40), eval_dataset=LMData(9))
        trainer.train()
        return trainer

    theirs, ours = run(transformers.Trainer), run(loop.Trainer)
    assert_same(theirs.state.log_history, ours.state.log_history)
    assert type(ours).calls == type(theirs).calls == 4
    assert ours.state.best_global_step == theirs.state.best_global_step
    assert ours.state.best_metric == theirs.state.best_metric
