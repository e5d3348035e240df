"""Trainer and the loop side by side: the same configuration must give the same log_history, bit for bit (CPU, fp32).

Every case builds one model, deep-copies it for each side, and compares every logged number except wall-clock
ones. This fails if either side changes behaviour (e.g. after a transformers upgrade).
"""

import numpy as np
import pytest
import torch
from helpers import (
    ClsData,
    LMData,
    PlainRegressor,
    RegData,
    assert_same,
    clone,
    tiny_bert_classifier,
    tiny_gpt2,
)
from transformers import Trainer, TrainingArguments

import loop


def accuracy(p):
    return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}


def run_both(tmp_path, model, train, eval_ds=None, compute_metrics=None, data_collator=None, **kw):
    base = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=5,
        learning_rate=1e-3,
        logging_steps=1,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    base.update(kw)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), **base)
    trainer = Trainer(
        model=clone(model),
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
    )
    trainer.train()
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "loop"))
    result = loop.train(
        config, clone(model), train, eval_dataset=eval_ds, compute_metrics=compute_metrics, data_collator=data_collator
    )
    return trainer.state.log_history, result.log_history


LM = dict(model=lambda: tiny_gpt2(), train=lambda: LMData(50), eval=lambda: LMData(13, seed=1))

CASES = {
    "ga_short_last_window_epochs_eval": dict(
        gradient_accumulation_steps=3,
        num_train_epochs=2,
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=3,
    ),
    "max_steps_across_epochs_log_every_2": dict(
        max_steps=17, gradient_accumulation_steps=2, logging_steps=2, lr_scheduler_type="cosine", warmup_steps=2
    ),
    "fractional_epochs": dict(num_train_epochs=1.5, lr_scheduler_type="constant_with_warmup", warmup_steps=3),
    "no_clipping": dict(max_grad_norm=0.0, max_steps=6),
    "dropout_seed_data_seed": dict(seed=7, data_seed=3, max_steps=8, dropout=0.1),
    "label_smoothing_causal": dict(label_smoothing_factor=0.1, max_steps=6, gradient_accumulation_steps=2),
    "ragged_labels_ga": dict(gradient_accumulation_steps=4, max_steps=5, ragged=True),
    "epoch_strategies_first_step": dict(
        num_train_epochs=2, logging_strategy="epoch", logging_first_step=True, eval_strategy="epoch"
    ),
    "eval_on_start_eval_delay": dict(
        max_steps=8, eval_on_start=True, eval_strategy="steps", eval_steps=2, eval_delay=4
    ),
    "sequential_sampler": dict(max_steps=5, train_sampling_strategy="sequential"),
    "tokens_seen_all": dict(max_steps=4, include_num_input_tokens_seen="all", eval_strategy="steps", eval_steps=2),
    "tokens_seen_non_padding": dict(max_steps=4, include_num_input_tokens_seen="non_padding"),
    "neftune_dropout_eval": dict(
        neftune_noise_alpha=5.0,
        dropout=0.1,
        max_steps=6,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=3,
    ),
}
SCHEDULERS = {
    "linear": {},
    "cosine": {},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"power": 2.0},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 3},
}
OPTIMIZERS = ["adamw_torch_fused", "adamw_torch", "sgd", "adafactor", "adagrad", "rmsprop"]


def _lm_case(tmp_path, dropout=0.0, ragged=False, **kw):
    model = tiny_gpt2(dropout=dropout)
    return run_both(tmp_path, model, LMData(50, ragged=ragged), LMData(13, seed=1), **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_causal_lm_cases(tmp_path, name):
    assert_same(*_lm_case(tmp_path, **CASES[name]))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("warmup", [2, 0.25])
def test_schedulers_with_int_and_ratio_warmup(tmp_path, scheduler, warmup):
    assert_same(
        *_lm_case(
            tmp_path,
            max_steps=8,
            lr_scheduler_type=scheduler,
            warmup_steps=warmup,
            lr_scheduler_kwargs=SCHEDULERS[scheduler],
        )
    )


def test_reduce_lr_on_plateau_steps_on_eval_metric(tmp_path):
    assert_same(
        *_lm_case(
            tmp_path,
            max_steps=8,
            lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={"patience": 0, "factor": 0.5},
            eval_strategy="steps",
            eval_steps=2,
        )
    )


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_optimizers_with_weight_decay_grouping(tmp_path, optim):
    assert_same(
        *_lm_case(
            tmp_path,
            max_steps=5,
            optim=optim,
            weight_decay=0.1,
            gradient_accumulation_steps=2,
            optim_args="momentum=0.9" if optim in ("sgd", "rmsprop") else None,
        )
    )


def test_sequence_classification_metrics_dropout_label_smoothing(tmp_path):
    expected, got = run_both(
        tmp_path,
        tiny_bert_classifier(),
        ClsData(40),
        ClsData(11, seed=1),
        compute_metrics=accuracy,
        num_train_epochs=2,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        label_smoothing_factor=0.05,
        weight_decay=0.01,
    )
    assert_same(expected, got)
    assert any("eval_accuracy" in r for r in got)


def test_padding_collator_batches_ga_and_classification(tmp_path):
    """DataCollatorWithPadding yields BatchEncoding (a Mapping, not a dict): items are counted as Trainer counts them."""
    from transformers import BertTokenizerFast, DataCollatorWithPadding

    words = [f"w{i}" for i in range(40)]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": tok(" ".join(words[j] for j in torch.randint(0, 40, (int(n),), generator=g)))["input_ids"],
            "labels": int(torch.randint(0, 3, (1,), generator=g)),
        }
        for n in torch.randint(2, 12, (30,), generator=g)
    ]
    expected, got = run_both(
        tmp_path,
        tiny_bert_classifier(),
        rows,
        rows[:9],
        compute_metrics=accuracy,
        data_collator=DataCollatorWithPadding(tok),
        max_steps=6,
        gradient_accumulation_steps=3,
        eval_strategy="steps",
        eval_steps=3,
    )
    assert_same(expected, got)


def test_plain_module_without_loss_kwargs(tmp_path):
    """A model that cannot take num_items_in_batch: the loss is averaged over the window (divided by its length)."""
    expected, got = run_both(
        tmp_path,
        PlainRegressor(),
        RegData(30),
        RegData(9, seed=1),
        max_steps=9,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    assert_same(expected, got)


def test_parity_detects_a_difference(tmp_path):
    """The comparison is not vacuous: a different learning rate shows up."""
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
    )
    trainer = Trainer(model=clone(model), args=args, train_dataset=LMData(20))
    trainer.train()
    config = loop.TrainConfig.from_training_arguments(args, output_dir=str(tmp_path / "l"), learning_rate=2e-3)
    got = loop.train(config, clone(model), LMData(20)).log_history
    with pytest.raises(AssertionError):
        assert_same(trainer.state.log_history, got)


def test_neftune_noise_changes_training_and_leaves_no_hook(tmp_path):
    """The neftune parity case is not vacuous (the noise changes the first loss), the hook leaves with training, and a
    model without get_input_embeddings is refused with one line."""
    model, losses = tiny_gpt2(), {}
    for alpha in (None, 5.0):
        trained = clone(model)
        config = loop.TrainConfig(
            output_dir=str(tmp_path / str(alpha)),
            per_device_train_batch_size=4,
            max_steps=3,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-3,
            neftune_noise_alpha=alpha,
        )
        losses[alpha] = [r["loss"] for r in loop.train(config, trained, LMData(20)).log_history if "loss" in r]
        embeddings = trained.get_input_embeddings()
        assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    assert losses[None][0] != losses[5.0][0]
    config = loop.TrainConfig(
        output_dir=str(tmp_path / "plain"),
        max_steps=2,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        neftune_noise_alpha=5.0,
    )
    with pytest.raises(loop.LoopError, match="get_input_embeddings"):
        loop.train(config, PlainRegressor(), RegData(20))
    with pytest.raises(loop.LoopError, match="neftune_noise_alpha must be >= 0"):
        loop.TrainConfig(neftune_noise_alpha=-1.0)


def test_head_that_ignores_num_items_inflates_the_loss_with_accumulation_on_both_sides(tmp_path):
    """transformers#47688: BERT's classification head declares **kwargs but ignores num_items_in_batch, so Trainer does
    not divide its per-batch mean by the accumulation length: with GA 2 the logged loss (and the gradient) is twice the
    GA 1 loss of the same 8 rows. The loop does the same by default (parity). Setting `model.accepts_loss_kwargs = False`
    makes both sides average over the window (docs/parity.md)."""

    def first_loss(model, batch, ga, name):
        expected, got = run_both(
            tmp_path / name,
            model,
            ClsData(16),
            max_steps=1,
            learning_rate=0.0,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
        )
        assert_same(expected, got)
        return got[0]["loss"]

    one = first_loss(tiny_bert_classifier(dropout=0.0), 8, 1, "ga1")
    assert abs(first_loss(tiny_bert_classifier(dropout=0.0), 4, 2, "ga2") - 2 * one) <= 1e-6 * one
    fixed = tiny_bert_classifier(dropout=0.0)
    fixed.accepts_loss_kwargs = False
    assert abs(first_loss(fixed, 4, 2, "ga2-fixed") - one) <= 1e-6 * one
