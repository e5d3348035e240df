"""Evaluation and prediction with Trainer's numbers: per-batch losses weighted by batch size, predictions and
labels gathered across ranks without duplicates.

gather_for_metrics drops the samples that DistributedSampler-style padding repeats on the last batch, so no
sample is counted twice across ranks.

`evaluate(config, model, eval_dataset, ...)` and `predict(config, model, test_dataset, ...)` are
Trainer.evaluate / Trainer.predict for a model outside a training run; `evaluation_loop` is what both, and the
evaluations during training, run.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Mapping

import numpy as np
import torch

from .callbacks import fire
from .errors import LoopError
from .model_changes import ModelChanges
from .step import forward_loss, window_item_count


def check_metrics_function(config, compute_metrics):
    """batch_eval_metrics calls compute_metrics once a batch and tells it, on the last, to return the summary."""
    if compute_metrics is not None and not callable(compute_metrics):
        raise LoopError(f"compute_metrics must be a function, got {type(compute_metrics).__name__}")
    if (
        config.batch_eval_metrics
        and compute_metrics is not None
        and "compute_result" not in inspect.signature(compute_metrics).parameters
    ):
        raise LoopError(
            "batch_eval_metrics calls compute_metrics(eval_pred, compute_result=...) once a batch: add a "
            "compute_result parameter (True on the last batch: return the metrics then), or set "
            "batch_eval_metrics false"
        )


def _ignored_at_inference(run) -> list:
    config = getattr(run.unwrapped, "config", None)
    return list(getattr(config, "keys_to_ignore_at_inference", ["past_key_values"])) if config is not None else []


def batch_prediction(run, model, batch, loss_only: bool, ignore_keys=None):
    """(loss, logits, labels) of one batch without gradients: Trainer's prediction_step, as the loop evaluates."""
    from transformers.trainer_pt_utils import nested_detach

    ignore = list(ignore_keys) if ignore_keys is not None else _ignored_at_inference(run)
    has_labels = bool(run.label_names) and all(batch.get(k) is not None for k in run.label_names)
    labels = nested_detach(tuple(batch.get(k) for k in run.label_names)) if has_labels else None
    if labels is not None and len(labels) == 1:
        labels = labels[0]
    with torch.no_grad():  # the prepared model's forward already runs under the Accelerator's autocast
        if has_labels:
            # per-batch mean over this rank's targets: unlike Trainer, eval_loss does not depend on world size
            n = window_item_count(run, [batch], across_ranks=False)
            loss, outputs = forward_loss(run, model, batch, n)
            loss = loss.detach().mean()
            logits = _predictions(run, outputs, ignore + ["loss"])
        else:
            loss, outputs = None, model(**batch)
            logits = _predictions(run, outputs, ignore, has_loss=False)
    if loss_only:
        return loss, None, None
    logits = nested_detach(logits)
    logits = logits[0] if isinstance(logits, tuple) and len(logits) == 1 else logits
    return loss, logits, labels


def evaluation_loop(run, loader, prefix: str = "eval", loss_only: bool | None = None, prediction: bool = False):
    """One pass over `loader`: (predictions, label_ids, metrics) as Trainer's evaluation_loop returns them.

    include_for_metrics adds the inputs and/or the per-sample losses to compute_metrics' EvalPrediction. With
    batch_eval_metrics, compute_metrics sees each batch as it is gathered (tensors) with compute_result True on the
    last, and its last return is the metrics; predictions are then kept for predict() only, as in Trainer."""
    from transformers.trainer_pt_utils import EvalLoopContainer, find_batch_size
    from transformers.trainer_utils import EvalPrediction, PredictionOutput, denumpify_detensorize, speed_metrics

    acc, model, cfg = run.accelerator, run.model, run.config
    gather = functools.partial(acc.gather_for_metrics, use_gather_object=cfg.eval_use_gather_object)  # Trainer's
    if run.evaluate_eagerly and hasattr(model, "_orig_mod"):
        # the module itself (fast.evaluates_eagerly): in training as Trainer does, and under `fast`, where evaluation's
        # shapes (grad mode, eval batch size, a short last batch, other lengths) would each cost a compilation
        model = model._orig_mod
    start = time.time()
    model.eval()
    if loss_only is None:  # predictions are gathered only when something will read them
        loss_only = run.compute_metrics is None or cfg.prediction_loss_only
    ignore = _ignored_at_inference(run)
    losses, preds, labels_all, inputs_all = (
        EvalLoopContainer(cfg.eval_do_concat_batches, padding_index=-100) for _ in range(4)
    )
    main_input = getattr(run.unwrapped, "main_input_name", "input_ids")
    keep = not cfg.batch_eval_metrics or prediction  # Trainer keeps predict()'s predictions in batch mode too
    batch_size, seen, metrics = cfg.per_device_eval_batch_size, 0, None
    for batch in loader:
        seen += find_batch_size(batch) or 0
        loss, logits, labels = batch_prediction(run, model, batch, False, ignore)
        fire(run.callbacks, "on_prediction_step", run)  # Trainer's event after each evaluation batch
        if loss is not None:
            loss = gather(loss.repeat(batch_size))
            losses.add(loss)
        if loss_only:
            continue
        if "inputs" in cfg.include_for_metrics and batch.get(main_input) is not None and keep:
            inputs_all.add(gather(acc.pad_across_processes(batch[main_input], dim=1, pad_index=-100)))
        if labels is not None:
            labels = acc.pad_across_processes(labels, dim=1, pad_index=-100)
        logits = acc.pad_across_processes(logits, dim=1, pad_index=-100)
        if run.preprocess_logits_for_metrics is not None:
            logits = run.preprocess_logits_for_metrics(logits, labels)
        logits = gather(logits)
        labels = gather(labels) if labels is not None else None
        if keep:
            preds.add(logits)
            if labels is not None:
                labels_all.add(labels)
        if cfg.batch_eval_metrics and run.compute_metrics is not None and labels is not None:
            metrics = run.compute_metrics(
                EvalPrediction(logits, labels, **_included(cfg, loss, batch)),
                compute_result=acc.gradient_state.end_of_dataloader,
            )
    all_losses, all_preds, all_labels = losses.get_arrays(), preds.get_arrays(), labels_all.get_arrays()
    all_inputs = inputs_all.get_arrays()
    dataset = getattr(loader, "dataset", None)  # a custom loader (a subclass's get_eval_dataloader) may have none
    num_samples = len(dataset) if hasattr(dataset, "__len__") else seen
    if (
        run.compute_metrics is not None
        and all_preds is not None
        and all_labels is not None
        and not cfg.batch_eval_metrics
    ):
        metrics = run.compute_metrics(EvalPrediction(all_preds, all_labels, **_included(cfg, all_losses, all_inputs)))
    metrics = denumpify_detensorize(metrics or {})
    if isinstance(all_losses, list) and all_losses:  # eval_do_concat_batches false: one array a batch
        all_losses = np.concatenate(all_losses)
    if isinstance(all_losses, np.ndarray):
        finite = np.isfinite(all_losses)
        if cfg.logging_nan_inf_filter and finite.any():
            all_losses = all_losses[finite]
        metrics[f"{prefix}_loss"] = all_losses.mean().item()
    metrics = {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}
    total_batch = cfg.per_device_eval_batch_size * acc.num_processes
    metrics.update(
        speed_metrics(prefix, start, num_samples=num_samples, num_steps=math.ceil(num_samples / total_batch))
    )
    return PredictionOutput(predictions=all_preds, label_ids=all_labels, metrics=metrics)


def _included(cfg, losses, inputs) -> dict:
    """include_for_metrics: what EvalPrediction carries besides the predictions and the labels."""
    return {
        "losses": losses if "loss" in cfg.include_for_metrics else None,
        "inputs": inputs if "inputs" in cfg.include_for_metrics else None,
    }


def _predictions(run, outputs, ignore, has_loss=True):
    """What the model predicted: its outputs without the loss (Trainer: a dict's other keys, a tuple's tail).
    With compute_loss_func the model returns no loss, so all of its output is prediction: a bare tensor or a whole
    tuple (Trainer would slice off their first element as if it were a loss)."""
    if isinstance(outputs, Mapping):
        return tuple(v for k, v in outputs.items() if k not in ignore)
    if torch.is_tensor(outputs):
        return (outputs,)
    return tuple(outputs[1:]) if has_loss and run.compute_loss_func is None else tuple(outputs)


def evaluate_metrics(run, loader, prefix: str = "eval") -> dict:
    """The metrics of one evaluation during training (predictions only if compute_metrics reads them)."""
    from .run import reshard

    metrics = evaluation_loop(run, loader, prefix).metrics
    if run.accelerator.distributed_type.name == "FSDP":
        reshard(run.unwrapped)  # shards back in place for whatever reads the parameters next (EMA, checkpoint)
    return metrics


# ---------------------------------------------------------------------------------------------- stand-alone
def _inference_run(
    config,
    model,
    dataset,
    data_collator,
    processing_class,
    compute_metrics,
    preprocess_logits_for_metrics,
    compute_loss_func,
    what,
    changes,
    compute_loss=None,
    dataloader=None,
):
    from .data import default_collator, eval_loader, given_loader, prepare_dataset
    from .fast import attention_context, evaluates_eagerly
    from .run import Run, place_model, start

    if dataset is None:
        raise LoopError(f"{what} needs a dataset")
    acc = start(config)
    check_metrics_function(config, compute_metrics)
    changes.track(model)
    full = torch.float16 if config.fp16_full_eval else torch.bfloat16 if config.bf16_full_eval else None
    if full is not None:  # Trainer's full-precision-cast evaluation: the model itself (in place), outside training only
        model = model.to(dtype=full)
    model = place_model(config, model, acc)
    run = Run(
        config,
        model,
        acc,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        compute_loss_func=compute_loss_func,
    )
    run.compute_loss = compute_loss  # a Trainer subclass's compute_loss (loop.Trainer), as its prediction_step uses it
    ds, collate = prepare_dataset(
        dataset, default_collator(data_collator, processing_class), model, config, run.label_names, what
    )
    loader = eval_loader(config, ds, collate, acc)
    if dataloader is not None:  # a Trainer subclass's get_eval/test_dataloader; its super() builds the loop's
        loader = given_loader(acc, dataloader(functools.partial(eval_loader, config, ds, collate, acc)))
    run.attention = attention_context(config.attention_backends)  # as in training
    run.evaluate_eagerly = evaluates_eagerly(config, in_training=False)
    run.model = acc.prepare(model)  # under the Accelerator's precision (autocast) and wrapping
    run.unwrapped = acc.unwrap_model(run.model, keep_torch_compile=False)  # the module itself, not its compiled wrapper
    return run, loader


def evaluate(
    config,
    model,
    eval_dataset,
    data_collator=None,
    compute_metrics=None,
    processing_class=None,
    preprocess_logits_for_metrics=None,
    compute_loss_func=None,
    metric_key_prefix: str = "eval",
    compute_loss=None,
    dataloader=None,
) -> dict:
    """Trainer.evaluate for `model` outside a training run: `eval_`-prefixed metrics (loss, compute_metrics' values,
    runtime and rates), over every sample once whatever the number of processes."""
    with ModelChanges() as changes:  # the wrappers and settings the run puts on the model come off after it
        run, loader = _inference_run(
            config,
            model,
            eval_dataset,
            data_collator,
            processing_class,
            compute_metrics,
            preprocess_logits_for_metrics,
            compute_loss_func,
            "evaluate",
            changes,
            compute_loss,
            dataloader,
        )
        return evaluation_loop(run, loader, metric_key_prefix).metrics


def predict(
    config,
    model,
    test_dataset,
    data_collator=None,
    compute_metrics=None,
    processing_class=None,
    preprocess_logits_for_metrics=None,
    compute_loss_func=None,
    metric_key_prefix: str = "test",
    compute_loss=None,
    dataloader=None,
):
    """Trainer.predict: PredictionOutput(predictions, label_ids, metrics), gathered from every process in dataset
    order with no sample counted twice; metrics are `test_`-prefixed (test_loss if the data has labels)."""
    with ModelChanges() as changes:
        run, loader = _inference_run(
            config,
            model,
            test_dataset,
            data_collator,
            processing_class,
            compute_metrics,
            preprocess_logits_for_metrics,
            compute_loss_func,
            "predict",
            changes,
            compute_loss,
            dataloader,
        )
        return evaluation_loop(run, loader, metric_key_prefix, loss_only=config.prediction_loss_only, prediction=True)
