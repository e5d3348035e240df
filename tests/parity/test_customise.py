"""Trainer's extension points as arguments: the same hooks give Trainer's numbers exactly (CPU, fp32).

compute_loss_func on a logits-only model, optimizers=(SGD over parameter groups, LambdaLR), optimizer_cls_and_kwargs,
model_init, per-group learning rates from config, and three Trainer subclasses ported to plain arguments.
"""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import (
    ClsData,
    LMData,
    SimpleClassifier,
    assert_same,
    clone,
    comparable,
    cross_entropy_over_items,
    tiny_bert_classifier,
    tiny_gpt2,
)
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import loop

BASE = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=5,
    learning_rate=1e-2,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    label_names=["labels"],
)


def _args(tmp_path, name="trainer", **kw):
    return TrainingArguments(output_dir=str(tmp_path / name), **{**BASE, **kw})


def _loop(tmp_path, args, model=None, train=None, eval_ds=None, **hooks):
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"))
    return loop.train(config, model, train, eval_dataset=eval_ds, **hooks).log_history


def sgd_with_groups(model):
    """SGD with momentum: the body at a tenth of the head's learning rate."""
    return torch.optim.SGD(
        [
            {"params": list(model.encoder.parameters()), "lr": 1e-3},
            {"params": list(model.classifier.parameters()), "lr": 1e-2},
        ],
        lr=1e-2,
        momentum=0.9,
    )


def halving_every_3(step):
    return 0.5 ** (step // 3)


@pytest.mark.parametrize("ga", [1, 3])
def test_compute_loss_func_on_logits_only_model(tmp_path, ga):
    model, train, val = SimpleClassifier(), ClsData(38), ClsData(11, seed=1)  # 38 rows: a short last window
    args = _args(tmp_path, gradient_accumulation_steps=ga, num_train_epochs=2, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(
        model=clone(model), args=args, train_dataset=train, eval_dataset=val, compute_loss_func=cross_entropy_over_items
    )
    trainer.train()
    got = _loop(tmp_path, args, clone(model), train, val, compute_loss_func=cross_entropy_over_items)
    assert_same(trainer.state.log_history, got)
    assert sum("eval_loss" in r for r in got) >= 2


def test_done_when_compute_loss_func_with_sgd_groups_and_lambda_lr_under_accumulation(tmp_path):
    """The issue's acceptance case: logits-only model, custom loss, optimizers=(SGD over groups, LambdaLR), GA."""
    model, train = SimpleClassifier(), ClsData(40)
    args = _args(tmp_path, gradient_accumulation_steps=2, max_steps=9)
    m1 = clone(model)
    opt1 = sgd_with_groups(m1)
    trainer = Trainer(
        model=m1,
        args=args,
        train_dataset=train,
        compute_loss_func=cross_entropy_over_items,
        optimizers=(opt1, torch.optim.lr_scheduler.LambdaLR(opt1, halving_every_3)),
    )
    trainer.train()
    m2 = clone(model)
    opt2 = sgd_with_groups(m2)
    got = _loop(
        tmp_path,
        args,
        m2,
        train,
        compute_loss_func=cross_entropy_over_items,
        optimizers=(opt2, torch.optim.lr_scheduler.LambdaLR(opt2, halving_every_3)),
    )
    assert_same(trainer.state.log_history, got)
    lrs = [r["learning_rate"] for r in got if "loss" in r]
    assert lrs[:4] == [1e-3, 1e-3, 1e-3, 5e-4]  # group 0 (the body), halved every 3 steps
    assert got[0]["loss"] != got[-2]["loss"]


def test_optimizer_given_without_scheduler_gets_trainers_schedule(tmp_path):
    model, train = SimpleClassifier(), ClsData(40)
    args = _args(tmp_path, max_steps=6, lr_scheduler_type="cosine", warmup_steps=2)
    m1 = clone(model)
    trainer = Trainer(
        model=m1,
        args=args,
        train_dataset=train,
        compute_loss_func=cross_entropy_over_items,
        optimizers=(sgd_with_groups(m1), None),
    )
    trainer.train()
    m2 = clone(model)
    got = _loop(
        tmp_path, args, m2, train, compute_loss_func=cross_entropy_over_items, optimizers=(sgd_with_groups(m2), None)
    )
    assert_same(trainer.state.log_history, got)


def test_optimizer_cls_and_kwargs(tmp_path):
    model, train = tiny_bert_classifier(dropout=0.0), ClsData(30)
    args = _args(tmp_path, max_steps=6, weight_decay=0.1, label_names=None)
    cls_kwargs = (torch.optim.SGD, {"lr": 5e-2, "momentum": 0.9, "nesterov": True})
    trainer = Trainer(model=clone(model), args=args, train_dataset=train, optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    got = _loop(tmp_path, args, clone(model), train, optimizer_cls_and_kwargs=cls_kwargs)
    assert_same(trainer.state.log_history, got)
    assert [r["learning_rate"] for r in got if "loss" in r][:2] == pytest.approx([5e-2, 5e-2 * 5 / 6])


def test_model_init(tmp_path):
    train, val = ClsData(30), ClsData(10, seed=1)
    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3, label_names=None)

    def model_init():
        return tiny_bert_classifier(seed=int(torch.randint(0, 1000, (1,))), dropout=0.1)  # drawn after the seed

    trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    got = _loop(tmp_path, args, None, train, val, model_init=model_init)
    assert_same(trainer.state.log_history, got)


def test_param_groups_field_matches_trainer_with_the_same_groups(tmp_path):
    """param_groups (config, no code) = Trainer given an optimizer with those groups; each group follows the schedule."""
    model, train = SimpleClassifier(), ClsData(40)
    args = _args(tmp_path, max_steps=8, warmup_steps=2, optim="adamw_torch")
    m1 = clone(model)
    body = [p for n, p in m1.named_parameters() if n.startswith("encoder")]
    decay = [p for n, p in m1.named_parameters() if n.startswith("classifier") and "bias" not in n]
    no_decay = [p for n, p in m1.named_parameters() if n.startswith("classifier") and "bias" in n]
    opt = torch.optim.AdamW(
        [
            {"params": body, "lr": 1e-2, "weight_decay": 0.0},  # the default groups: learning_rate
            {"params": decay, "lr": 1e-1, "weight_decay": 0.05},
            {"params": no_decay, "lr": 1e-1, "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    trainer = Trainer(
        model=m1, args=args, train_dataset=train, compute_loss_func=cross_entropy_over_items, optimizers=(opt, None)
    )
    trainer.train()
    config = loop.TrainConfig.from_training_arguments(
        args,
        output_dir=str(tmp_path / "loop"),
        param_groups=[{"name": "head", "pattern": r"^classifier\.", "learning_rate": 0.1, "weight_decay": 0.05}],
    )
    got = loop.train(config, clone(model), train, compute_loss_func=cross_entropy_over_items).log_history
    strip = [{k: v for k, v in r.items() if not k.startswith("learning_rate/")} for r in got]
    assert_same(trainer.state.log_history, strip)
    for r in (r for r in got if "loss" in r):
        assert r["learning_rate/head"] == pytest.approx(10 * r["learning_rate"], rel=1e-12)
    assert [r["learning_rate"] for r in got if "loss" in r][:3] == [0.0, 5e-3, 1e-2]  # warmup, then linear decay


def test_param_groups_from_yaml_and_cli_and_bad_values(tmp_path):
    from loop.job import build_job

    job = tmp_path / "job.yaml"
    job.write_text("task: causal_lm\nparam_groups:\n  - {name: head, pattern: lm_head, learning_rate: 1e-4}\n")
    config, _, _ = build_job(["--config", str(job)])
    assert config.param_groups == [{"name": "head", "pattern": "lm_head", "learning_rate": 1e-4}]
    config, _, _ = build_job(
        ["--config", str(job), "--param_groups", '[{"pattern": "h\\\\.0\\\\.", "weight_decay": 0}]']
    )
    assert config.param_groups == [{"pattern": "h\\.0\\.", "weight_decay": 0.0}]
    for bad, needle in (
        ([{"lr": 1}], "needs a `pattern`"),
        ([{"pattern": "(", "learning_rate": 1}], "regular expression"),
        ([{"pattern": "a", "learnig_rate": 1}], "did you mean `learning_rate`"),
        ([{"pattern": "a", "learning_rate": -1}], ">= 0"),
    ):
        with pytest.raises(loop.LoopError, match=needle.replace("(", r"\(")):
            loop.TrainConfig(param_groups=bad)
    config = loop.TrainConfig(
        output_dir=str(tmp_path / "x"), use_cpu=True, max_steps=1, param_groups=[{"pattern": "encodr"}]
    )
    with pytest.raises(loop.LoopError, match="matches no trainable parameter"):
        loop.train(config, SimpleClassifier(), ClsData(8), compute_loss_func=cross_entropy_over_items)


def test_bad_hook_combinations_give_one_line(tmp_path):
    config = loop.TrainConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=1)
    m = SimpleClassifier()
    for kwargs, needle in (
        (dict(model=m, model_init=SimpleClassifier), "either model or model_init"),
        (dict(model=None), "needs a model"),
        (
            dict(model=m, optimizers=(sgd_with_groups(m), None), optimizer_cls_and_kwargs=(torch.optim.SGD, {})),
            "not both",
        ),
        (dict(model=m, optimizers=("adam", None)), "torch.optim.Optimizer"),
        (dict(model=m, compute_loss_func="ce"), "must be a function"),
    ):
        with pytest.raises(loop.LoopError, match=needle):
            loop.train(config, train_dataset=ClsData(8), **kwargs)
    with pytest.raises(loop.LoopError, match="returned no loss.*compute_loss_func"):
        loop.train(config, SimpleClassifier(), ClsData(8), label_names=None) if False else loop.train(
            config, SimpleClassifier(), ClsData(8)
        )


# ---------------------------------------------------------------------------------------------- ported subclasses
class CustomTrainer(Trainer):
    """The classic subclass: compute_loss on a model that returns only logits (a per-batch mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        return (loss, logits) if return_outputs else loss


class CustomOptimizerTrainer(Trainer):
    """create_optimizer: SGD with momentum, the pretrained body slower than the new head."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = sgd_with_groups(self.model)
        return self.optimizer


def mean_cross_entropy(outputs, labels):
    """CustomTrainer.compute_loss as a function: no num_items_in_batch parameter, so a per-batch mean (divided by
    the window length, as Trainer divides a subclass's loss)."""
    return nn.functional.cross_entropy(outputs, labels)


def test_port_custom_trainer_compute_loss(tmp_path):
    model, train, val = SimpleClassifier(), ClsData(38), ClsData(11, seed=1)
    args = _args(tmp_path, gradient_accumulation_steps=3, num_train_epochs=2, eval_strategy="epoch")
    trainer = CustomTrainer(model=clone(model), args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    got = _loop(tmp_path, args, clone(model), train, val, compute_loss_func=mean_cross_entropy)
    assert_same(trainer.state.log_history, got)


@pytest.mark.parametrize("how", ["optimizers", "config"])
def test_port_custom_optimizer_trainer(tmp_path, how):
    model, train = SimpleClassifier(), ClsData(40)
    args = _args(tmp_path, max_steps=8, gradient_accumulation_steps=2, learning_rate=1e-3)
    trainer = CustomOptimizerTrainer(
        model=clone(model), args=args, train_dataset=train, compute_loss_func=cross_entropy_over_items
    )
    trainer.train()
    if how == "optimizers":
        m = clone(model)
        got = _loop(
            tmp_path, args, m, train, compute_loss_func=cross_entropy_over_items, optimizers=(sgd_with_groups(m), None)
        )
    else:  # no code: optim, optim_args and param_groups in the config
        config = loop.TrainConfig.from_training_arguments(
            args, output_dir=str(tmp_path / "loop"), param_groups=[{"pattern": "^classifier", "learning_rate": 1e-2}]
        )
        config.optim, config.optim_args = "sgd", "momentum=0.9"
        got = loop.train(config, clone(model), train, compute_loss_func=cross_entropy_over_items).log_history
        got = [{k: v for k, v in r.items() if not k.startswith("learning_rate/")} for r in got]
    assert_same(trainer.state.log_history, got)


class EMACallback(TrainerCallback):
    """What people bolt onto Trainer for EMA: e = d*e + (1-d)*w after every optimizer step."""

    def __init__(self, decay):
        self.decay, self.shadow = decay, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            for n, p in model.named_parameters():
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)


def test_port_ema_trainer(tmp_path):
    """The loop's own EMA (ema_decay) holds what the Trainer+callback EMA holds, within fp32 rounding."""
    from safetensors.torch import load_file

    model, train = SimpleClassifier(), ClsData(40)
    args = _args(tmp_path, max_steps=10)
    cb = EMACallback(0.9)
    trainer = Trainer(
        model=clone(model), args=args, train_dataset=train, compute_loss_func=cross_entropy_over_items, callbacks=[cb]
    )
    trainer.train()
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"), ema_decay=0.9)
    got = loop.train(config, clone(model), train, compute_loss_func=cross_entropy_over_items)
    assert_same(trainer.state.log_history, got.log_history)
    ema = load_file(str(tmp_path / "loop" / "ema" / "model.safetensors"))
    final = dict(trainer.model.named_parameters())
    for n, e in cb.shadow.items():
        torch.testing.assert_close(ema[n], e, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(e, final[n].detach())  # the EMA is not the final weights


# ---------------------------------------------------------------------------------------------- evaluate / predict
def accuracy(p):
    return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}


def same(metrics):
    """Metrics as compared with Trainer's: Trainer adds its model-preparation timing and its state's epoch."""
    return {k: v for k, v in comparable(metrics).items() if k != "epoch" and not k.endswith("_preparation_time")}


def test_evaluate_and_predict_match_trainer(tmp_path):
    model, data = tiny_bert_classifier(dropout=0.1), ClsData(23, seed=2)
    args = _args(tmp_path, label_names=None, per_device_eval_batch_size=4)
    trainer = Trainer(model=clone(model), args=args, compute_metrics=accuracy)
    expected_eval = trainer.evaluate(data)
    expected = trainer.predict(data)
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"))
    got_eval = loop.evaluate(config, clone(model), data, compute_metrics=accuracy)
    got = loop.predict(config, clone(model), data, compute_metrics=accuracy)
    assert same(got_eval) == same(expected_eval) and "eval_accuracy" in got_eval
    assert same(got.metrics) == same(expected.metrics) and "test_loss" in got.metrics
    np.testing.assert_array_equal(got.predictions, expected.predictions)
    np.testing.assert_array_equal(got.label_ids, expected.label_ids)
    assert got.predictions.shape == (23, 3)


def with_inputs_and_losses(p):  # include_for_metrics ["inputs", "loss"]: EvalPrediction carries both
    return {
        "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean()),
        "rows": len(p.inputs),
        "input_sum": int(p.inputs.sum()),
        "loss_sum": float(p.losses.sum()),
    }


def over_batches(p):  # eval_do_concat_batches false: one array a batch
    right = sum(int((b.argmax(-1) == y).sum()) for b, y in zip(p.predictions, p.label_ids))
    return {"accuracy": right / sum(len(y) for y in p.label_ids), "batches": len(p.predictions)}


class BatchAccuracy:
    """batch_eval_metrics: called once a batch with tensors; sums, and returns the summary on the last batch."""

    def __init__(self):
        self.right = self.rows = self.calls = 0
        self.loss = 0.0

    def __call__(self, p, compute_result):
        self.calls += 1
        self.right += int((p.predictions.argmax(-1) == p.label_ids).sum())
        self.rows += len(p.label_ids)
        self.loss += float(p.losses.sum())
        if compute_result:
            out = {"accuracy": self.right / self.rows, "batches": self.calls, "loss_sum": self.loss}
            self.__init__()
            return out


@pytest.mark.parametrize(
    "name,metrics,kw,expect",
    [
        ("inputs_and_losses", with_inputs_and_losses, dict(include_for_metrics=["inputs", "loss"]), {"eval_rows": 23}),
        ("not_concatenated", over_batches, dict(eval_do_concat_batches=False), {"eval_batches": 6}),
        (
            "batch_metrics",
            BatchAccuracy(),
            dict(batch_eval_metrics=True, include_for_metrics=["loss"]),
            {"eval_batches": 6},
        ),
    ],
)
def test_metrics_options_match_trainer_in_training_evaluate_and_predict(tmp_path, name, metrics, kw, expect):
    """include_for_metrics, eval_do_concat_batches and batch_eval_metrics: the same log (evaluations during training
    included), evaluate() and predict() as Trainer's."""
    model, train, data = tiny_bert_classifier(dropout=0.1), ClsData(30), ClsData(23, seed=2)
    args = _args(tmp_path, per_device_eval_batch_size=4, max_steps=4, eval_strategy="steps", eval_steps=2, **kw)
    trainer = Trainer(model=clone(model), args=args, train_dataset=train, eval_dataset=data, compute_metrics=metrics)
    trainer.train()
    history = list(trainer.state.log_history)  # before evaluate() adds its record
    expected_eval, expected = trainer.evaluate(data), trainer.predict(data)
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"))
    result = loop.train(config, clone(model), train, eval_dataset=data, compute_metrics=metrics)
    trained = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop-eval"))
    weights = trainer.model  # evaluate/predict the same trained weights on both sides
    got_eval = loop.evaluate(trained, clone(weights), data, compute_metrics=metrics)
    got = loop.predict(trained, clone(weights), data, compute_metrics=metrics)

    evals = [r for r in result.log_history if "eval_loss" in r]
    assert [same(r) for r in evals] == [same(r) for r in history if "eval_loss" in r]
    assert len(evals) == 2 and all(r[k] == v for r in evals for k, v in expect.items())
    assert same(got_eval) == same(expected_eval)
    assert same(got.metrics) == same(expected.metrics) and got.metrics["test_accuracy"] > 0
    predictions = np.concatenate(got.predictions) if isinstance(got.predictions, list) else got.predictions
    np.testing.assert_array_equal(
        predictions,
        np.concatenate(expected.predictions) if isinstance(expected.predictions, list) else expected.predictions,
    )
    assert predictions.shape == (23, 3)


@pytest.mark.parametrize("cast", ["bf16_full_eval", "fp16_full_eval"])
def test_full_eval_casts_the_model_as_trainer_does(tmp_path, cast):
    """evaluate()/predict() outside training with bf16/fp16_full_eval: the model cast in place, Trainer's numbers."""
    model, data = tiny_bert_classifier(dropout=0.1), ClsData(23, seed=2)
    args = _args(tmp_path, per_device_eval_batch_size=4, **{cast: True})
    expected = Trainer(model=clone(model), args=args, compute_metrics=accuracy).evaluate(data)
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"))
    cast_model, plain = clone(model), clone(model)
    got = loop.evaluate(config, cast_model, data, compute_metrics=accuracy)
    fp32 = loop.evaluate(
        loop.TrainConfig(
            output_dir=str(tmp_path / "fp32"), use_cpu=True, report_to="none", per_device_eval_batch_size=4
        ),
        plain,
        data,
        compute_metrics=accuracy,
    )
    assert same(got) == same(expected)
    assert got["eval_loss"] != fp32["eval_loss"]
    assert next(cast_model.parameters()).dtype == (torch.bfloat16 if cast == "bf16_full_eval" else torch.float16)


def test_batch_eval_metrics_needs_compute_result(tmp_path):
    config = loop.TrainConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        use_cpu=True,
        report_to="none",
        batch_eval_metrics=True,
        eval_strategy="steps",
        eval_steps=1,
    )
    with pytest.raises(loop.LoopError, match="compute_result"):
        loop.train(config, tiny_bert_classifier(), ClsData(8), eval_dataset=ClsData(4), compute_metrics=accuracy)
    with pytest.raises(loop.LoopError, match="compute_result"):
        loop.evaluate(config, tiny_bert_classifier(), ClsData(4), compute_metrics=accuracy)
    with pytest.raises(loop.LoopError, match="include_for_metrics: 'logits' is not an option"):
        loop.TrainConfig(include_for_metrics=["logits"])
    assert not (tmp_path / "model.safetensors").exists()


def test_predict_logits_only_model_with_compute_loss_func(tmp_path):
    """With compute_loss_func the whole output is the prediction (Trainer would slice a bare tensor's first row)."""
    model, data = SimpleClassifier(), ClsData(9)
    config = loop.TrainConfig(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=3)
    out = loop.predict(config, model, data, compute_loss_func=cross_entropy_over_items)
    with torch.no_grad():
        expected = model(data.x, torch.ones_like(data.x))
    np.testing.assert_allclose(out.predictions, expected.numpy(), rtol=1e-5, atol=1e-6)  # batches of 3 vs 9
    np.testing.assert_array_equal(out.label_ids, data.y.numpy())
    # three equal batches: the loss is the mean cross-entropy over all nine samples
    assert out.metrics["test_loss"] == pytest.approx(float(nn.functional.cross_entropy(expected, data.y)), rel=1e-6)


def _report(stdout: str) -> str:
    """DebugUnderflowOverflow's printout, without Trainer's own log lines (dicts printed to stdout)."""
    return "".join(line for line in stdout.splitlines(True) if not line.startswith("{'"))


def test_debug_underflow_overflow_stops_at_trainers_batch_with_trainers_report(tmp_path, capsys):
    """debug underflow_overflow: a run blown up by its learning rate stops at the same forward as Trainer's, having
    printed the same frames; a healthy run logs Trainer's numbers, and the hooks are gone when training ends."""
    model, data = tiny_gpt2(), LMData(64)
    args = _args(
        tmp_path,
        learning_rate=1e30,
        max_grad_norm=0,
        max_steps=8,
        gradient_accumulation_steps=2,
        debug="underflow_overflow",
    )
    with pytest.raises(ValueError, match="DebugUnderflowOverflow: inf/nan detected"):
        Trainer(model=clone(model), args=args, train_dataset=data).train()
    expected = _report(capsys.readouterr().out)
    config = loop.TrainConfig.from_training_arguments(
        args, output_dir=str(tmp_path / "diverged"), save_steps=1, save_strategy="steps"
    )
    assert config.debug == "underflow_overflow"
    diverged = clone(model)
    with pytest.raises(loop.LoopError, match=r"inf/nan in a forward of step 2 \(batch number 2;"):
        loop.train(config, diverged, data)
    got = capsys.readouterr().out
    assert "Detected inf/nan during batch_number=2" in got and got == expected
    assert not any(m._forward_hooks for m in diverged.modules())
    assert sorted(p.name for p in (tmp_path / "diverged").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1"
    ]
    assert not (tmp_path / "diverged" / "model.safetensors").exists()

    healthy = _args(tmp_path, name="healthy", max_steps=4, gradient_accumulation_steps=2, debug="underflow_overflow")
    trainer = Trainer(model=clone(model), args=healthy, train_dataset=data)
    trainer.train()
    trained = clone(model)
    assert_same(trainer.state.log_history, _loop(tmp_path, healthy, trained, data))
    assert not any(m._forward_hooks for m in trained.modules())
    # packed rows (position_ids restarting): GPT-2 hands its blocks a boolean block mask, on which transformers'
    # class fails (abs() of a bool tensor); the loop reads it as 0/1, and the hooks do not change a number
    packed = [{**row, "position_ids": torch.arange(16) % 8} for row in LMData(16, seed=3)]
    plain = loop.TrainConfig(
        output_dir=str(tmp_path / "plain"),
        use_cpu=True,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        telemetry=False,
    )
    checked = dataclasses.replace(plain, output_dir=str(tmp_path / "checked"), debug="underflow_overflow")
    assert_same(
        loop.train(plain, clone(model), packed).log_history, loop.train(checked, clone(model), packed).log_history
    )
    assert "bool" not in capsys.readouterr().err
    with pytest.raises(loop.LoopError, match="does not run on TPUs"):
        loop.TrainConfig(debug="tpu_metrics_debug")
    with pytest.raises(loop.LoopError, match="did you mean `underflow_overflow`"):
        loop.TrainConfig(debug="underflow_overfow")


# ---------------------------------------------------------------------------------------------- a replaceable step
def _fgm():
    from helpers import doc_block

    scope = {}
    exec(doc_block("# fgm_step"), scope)  # docs/api.md's function, as printed there
    return scope["fgm_step"]


def test_fgm_step_from_the_readme_trains_and_composes_the_default_pieces(tmp_path):
    import functools

    fgm_step = _fgm()
    model, train = tiny_bert_classifier(dropout=0.0), ClsData(24)
    train.y = train.x[:, 0] % 3  # learnable labels: the first token decides

    def run(step=None, lr=2e-3, name="x", epochs=4, optim="sgd"):
        config = loop.TrainConfig(
            output_dir=str(tmp_path / name),
            use_cpu=True,
            per_device_train_batch_size=4,
            num_train_epochs=epochs,
            logging_steps=1,
            optim=optim,
            learning_rate=lr,
            max_grad_norm=0,
            save_strategy="no",
            disable_tqdm=True,
            telemetry=False,
            lr_scheduler_type="constant",
        )
        return [
            r["loss"] for r in loop.train(config, clone(model), train, optimizer_step=step).log_history if "loss" in r
        ]

    default = run(lr=0.2, name="default")
    # epsilon 0: the adversarial pass adds the clean gradient again, i.e. twice the gradient: the default step at 2x lr
    assert run(functools.partial(fgm_step, epsilon=0.0), lr=0.1, name="eps0") == default
    assert len(default) == 24
    adversarial = run(functools.partial(fgm_step, epsilon=0.05), lr=1e-2, name="fgm", epochs=30, optim="adamw_torch")
    assert sum(adversarial[-6:]) / 6 < 0.7 * sum(adversarial[:6]) / 6  # it trains: the loss falls
    clean = run(lr=1e-2, name="clean", epochs=30, optim="adamw_torch")
    assert adversarial[1:] != clean[1:]  # and the perturbation changed the training (step 1 saw the same weights)
