"""EMA: closed form on a run whose weights are known, skipped updates, swap-in evaluation, saving, resume."""

import os

import pytest
import torch
from helpers import LMData, tiny_gpt2
from torch import nn

import loop


class Recorder(loop.Callback):
    """Records the weights after every optimizer step (the w_t of the closed form)."""

    def __init__(self):
        self.weights = []

    def on_train_begin(self, run):
        self.weights.append([p.detach().clone().double() for p in run.unwrapped.parameters() if p.requires_grad])

    def on_step_end(self, run):
        self.weights.append([p.detach().clone().double() for p in run.unwrapped.parameters() if p.requires_grad])
        self.ema = [t.clone().double() for t in run.ema.shadow]


def closed_form(weights, decay, warmup=False, start=0):
    e = [w.clone() for w in weights[0]]
    for t in range(1, len(weights)):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        e = [w.clone() for w in weights[t]] if t <= start else [d * a + (1 - d) * w for a, w in zip(e, weights[t])]
    return e


@pytest.mark.parametrize("warmup,start", [(False, 0), (True, 0), (False, 3)])
def test_ema_equals_closed_form(tmp_path, warmup, start):
    rec = Recorder()
    config = loop.TrainConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-2,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        ema_decay=0.9,
        ema_warmup=warmup,
        ema_start_step=start,
        logging_steps=4,
    )
    loop.train(config, tiny_gpt2(), LMData(40), callbacks=[rec])
    expected = closed_form(rec.weights, 0.9, warmup, start)
    for e, got in zip(expected, rec.ema):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
    # and the EMA really differs from the raw weights
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(rec.ema, rec.weights[-1]))


def test_ema_eval_final_save_and_reload(tmp_path):
    from transformers import GPT2LMHeadModel

    config = loop.TrainConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        ema_decay=0.8,
        logging_steps=3,
        eval_strategy="steps",
        eval_steps=3,
    )
    model = tiny_gpt2()
    result = loop.train(config, model, LMData(40), eval_dataset=LMData(8, seed=1))
    evals = [r for r in result.log_history if "eval_ema_loss" in r]
    raws = [r for r in result.log_history if "eval_loss" in r]
    assert len(evals) == len(raws) == 2 and evals[-1]["eval_ema_loss"] != raws[-1]["eval_loss"]
    ema_model = GPT2LMHeadModel.from_pretrained(os.path.join(tmp_path, "ema"))
    raw_model = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    torch.testing.assert_close(raw_model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    assert not torch.allclose(ema_model.transformer.h[0].mlp.c_fc.weight, raw_model.transformer.h[0].mlp.c_fc.weight)


def test_plain_module_ema_is_saved_as_safetensors(tmp_path):
    from helpers import PlainRegressor, RegData
    from safetensors.torch import load_file

    config = loop.TrainConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        ema_decay=0.5,
    )
    loop.train(config, PlainRegressor(), RegData(20))
    weights = load_file(os.path.join(tmp_path, "ema", "model.safetensors"))
    assert set(weights) == {n for n, _ in PlainRegressor().named_parameters()}


def test_ema_resumes_exactly(tmp_path):
    def cfg(**kw):
        return loop.TrainConfig(
            output_dir=str(tmp_path / kw.pop("name")),
            per_device_train_batch_size=4,
            max_steps=8,
            save_steps=4,
            learning_rate=1e-2,
            use_cpu=True,
            disable_tqdm=True,
            ema_decay=0.9,
            logging_steps=1,
            **kw,
        )

    full = Recorder()
    loop.train(cfg(name="a"), tiny_gpt2(), LMData(40), callbacks=[full])
    stop = type("S", (loop.Callback,), {"on_step_end": lambda s, run: "stop" if run.state.global_step == 4 else None})
    loop.train(cfg(name="b"), tiny_gpt2(), LMData(40), callbacks=[stop()])
    resumed = Recorder()
    loop.train(cfg(name="b"), tiny_gpt2(), LMData(40), callbacks=[resumed], resume_from_checkpoint="latest")
    for a, b in zip(full.ema, resumed.ema):
        assert torch.equal(a, b)


def test_skipped_step_does_not_update_ema():
    """step.finish_step, the loop's own tail of every step: an fp16 step the scaler skipped leaves the EMA (and the
    schedule) where they were; a real step folds the weights in."""
    from types import SimpleNamespace

    from loop.ema import EMA
    from loop.step import finish_step

    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    before = [t.clone() for t in ema.shadow]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    with torch.no_grad():
        model.weight.add_(1.0)
    run = SimpleNamespace(
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        group_names=[],
        last_lr=None,
        state=SimpleNamespace(global_step=0),
        note_nonfinite=lambda g: None,
        accelerator=SimpleNamespace(optimizer_step_was_skipped=True),
        sharded=None,  # no sharded optimizer (loop/zero.py)
    )
    finish_step(run, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow)) and scheduler.last_epoch == 0
    run.accelerator.optimizer_step_was_skipped = False
    finish_step(run, torch.tensor(1.0))
    torch.testing.assert_close(ema.shadow[0], 0.5 * before[0] + 0.5 * model.weight.detach())
    assert scheduler.last_epoch == 1
