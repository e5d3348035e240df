"""The caller's model is theirs: after loop.train / loop.evaluate / loop.predict return or raise, the model carries
no attribute, hook, attention implementation, config value or weight the loop put there (loop/model_changes.py).
Each test trains with one feature that changes the model during the run, then compares the model with a snapshot
taken before it, and checks that it behaves as a plain model again."""

import pytest
import torch
from helpers import ClsData, LMData, PackedLM, fingerprint, tiny_bert_classifier, tiny_gpt2

import loop
from loop import TrainConfig
from loop.errors import LoopError


def cfg(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        telemetry=False,
    )
    return TrainConfig(**{**base, **overrides})


def plain_lm_forward_works(model):
    """A train-mode forward with labels gives real logits and a loss, as an untouched GPT-2 does."""
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 64)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "feature",
    [
        dict(fused_linear_cross_entropy=True),
        dict(neftune_noise_alpha=5.0),
        dict(debug="underflow_overflow"),
        dict(gradient_checkpointing=True),
        dict(bf16=True),  # accelerate's autocast forward wrapper
        dict(ema_decay=0.9, eval_strategy="steps", eval_steps=2),
        dict(use_cache=True),
    ],
)
def test_train_leaves_the_model_as_it_was_but_for_its_weights(tmp_path, feature):
    model = tiny_gpt2()
    before = fingerprint(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loop.train(
        cfg(tmp_path, **feature),
        model,
        train_dataset=LMData(16, ragged=True),
        eval_dataset=LMData(8, seed=1) if "eval_strategy" in feature else None,
    )
    assert fingerprint(model) == before
    assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())  # it did train
    plain_lm_forward_works(model)


def test_fused_loss_is_taken_off_when_the_run_raises(tmp_path):
    class Boom(loop.Callback):
        def on_step_end(self, run):
            if run.state.global_step == 2:
                raise RuntimeError("boom")

    model = tiny_gpt2()
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="boom"):
        loop.train(
            cfg(tmp_path, fused_linear_cross_entropy=True, gradient_checkpointing=True),
            model,
            train_dataset=LMData(16),
            callbacks=[Boom()],
        )
    assert fingerprint(model) == before
    plain_lm_forward_works(model)


def test_varlen_attention_is_switched_back_after_training(tmp_path, monkeypatch):
    from loop import varlen_attention as va

    monkeypatch.setattr(va, "why_not", lambda *a: None)  # the CUDA checks waived: the per-document maths on CPU
    model = tiny_gpt2()
    model.config.use_cache = False
    before = fingerprint(model)
    seen = []
    monkeypatch.setattr(
        loop.fit,
        "log_loss",
        lambda run, real=loop.fit.log_loss: (seen.append(run.unwrapped.config._attn_implementation), real(run))[1],
    )
    loop.train(cfg(tmp_path, varlen_attention=True), model, train_dataset=PackedLM(40))
    assert set(seen) == {va.NAME}  # it was on during training
    assert fingerprint(model) == before and model.config._attn_implementation != va.NAME


def test_a_failing_ema_evaluation_leaves_the_trained_weights_in_the_model(tmp_path):
    """compute_metrics raising during the EMA evaluation (the second of a pair) must not leave the EMA in the model."""
    model = tiny_bert_classifier()
    calls, trained = [], {}

    def metrics(pred):
        calls.append(1)
        if len(calls) == 1:  # the plain evaluation: the model holds the trained weights now
            trained.update({k: v.clone() for k, v in model.state_dict().items()})
            return {"n": 1.0}
        raise ValueError("metric failed")

    with pytest.raises(ValueError, match="metric failed"):
        loop.train(
            cfg(tmp_path, ema_decay=0.5, eval_strategy="steps", eval_steps=2, learning_rate=1e-2),
            model,
            train_dataset=ClsData(16),
            eval_dataset=ClsData(8, seed=1),
            compute_metrics=metrics,
        )
    assert len(calls) == 2
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in trained.items())


@pytest.mark.parametrize("what", ["evaluate", "predict"])
def test_evaluate_and_predict_leave_the_model_as_it_was(tmp_path, what):
    model = tiny_gpt2()
    before = fingerprint(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    getattr(loop, what)(cfg(tmp_path, bf16=True, gradient_checkpointing=True), model, LMData(8))
    assert fingerprint(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_refused_run_leaves_the_model_as_it_was(tmp_path):
    """Refused after the model was placed and patched (the fused loss cannot serve a label smoother)."""
    model = tiny_gpt2()
    before = fingerprint(model)
    with pytest.raises(LoopError, match="fused_linear_cross_entropy"):
        loop.train(
            cfg(tmp_path, fused_linear_cross_entropy=True, label_smoothing_factor=0.1, gradient_checkpointing=True),
            model,
            train_dataset=LMData(16),
        )
    assert fingerprint(model) == before


def test_a_second_run_into_the_same_output_dir_is_refused_unless_it_resumes_or_overwrites(tmp_path):
    config = cfg(tmp_path, save_strategy="steps", save_steps=2)
    loop.train(config, tiny_gpt2(), LMData(16))
    out = tmp_path / "out"
    assert (out / "checkpoint-4").is_dir() and (out / "metrics.jsonl").exists()
    model = tiny_gpt2()
    before = fingerprint(model)
    with pytest.raises(
        LoopError,
        match="holds another run .*metrics.jsonl, checkpoint-2, checkpoint-4.*"
        "--resume_from_checkpoint latest.*--overwrite_output_dir true",
    ):
        loop.train(config, model, LMData(16))
    assert fingerprint(model) == before
    # a resume is the same run: allowed
    loop.train(config, tiny_gpt2(), LMData(16), resume_from_checkpoint=str(out / "checkpoint-2"))
    # overwrite: the other run's records, checkpoints and final model go first; other files stay
    (out / "notes.txt").write_text("mine")
    import dataclasses
    import json

    loop.train(dataclasses.replace(config, overwrite_output_dir=True, save_strategy="no"), tiny_gpt2(), LMData(16))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [2, 4] and not any("event" in r for r in records)
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir()) and (out / "notes.txt").exists()


def test_early_stopping_without_its_metric_is_refused_before_the_model_is_touched(tmp_path):
    model = tiny_gpt2()
    before = fingerprint(model)
    with pytest.raises(LoopError, match="EarlyStopping judges metric_for_best_model, which is unset"):
        loop.train(
            cfg(tmp_path, eval_strategy="steps", eval_steps=2),
            model,
            LMData(16),
            eval_dataset=LMData(8),
            callbacks=[loop.EarlyStopping(patience=2)],
        )
    assert fingerprint(model) == before and not (tmp_path / "out").exists()
