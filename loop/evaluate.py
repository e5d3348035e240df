"""Evaluation with Trainer's numbers: per-batch losses weighted by batch size, gathered without duplicates.

gather_for_metrics drops the samples that DistributedSampler-style padding repeats on the last batch, so no
sample is counted twice across ranks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .step import forward_loss, window_item_count


def evaluate(run, loader, prefix: str = "eval") -> dict:
    from transformers.trainer_pt_utils import EvalLoopContainer, find_batch_size, nested_detach
    from transformers.trainer_utils import EvalPrediction, denumpify_detensorize, speed_metrics

    acc, model, cfg = run.accelerator, run.model, run.config
    start = time.time()
    model.eval()
    loss_only = run.compute_metrics is None or cfg.prediction_loss_only
    ignore = list(getattr(getattr(run.unwrapped, "config", None), "keys_to_ignore_at_inference", ["past_key_values"])) \
        if hasattr(run.unwrapped, "config") else []
    losses, preds, labels_all = (EvalLoopContainer(True, padding_index=-100) for _ in range(3))
    batch_size, seen = cfg.per_device_eval_batch_size, 0
    for batch in loader:
        seen += find_batch_size(batch) or 0
        has_labels = bool(run.label_names) and all(batch.get(k) is not None for k in run.label_names)
        labels = nested_detach(tuple(batch.get(k) for k in run.label_names)) if has_labels else None
        if labels is not None and len(labels) == 1:
            labels = labels[0]
        with torch.no_grad():  # the prepared model's forward already runs under the Accelerator's autocast
            if has_labels:
                # per-batch mean over this rank's targets: unlike Trainer, eval_loss does not depend on world size
                n = window_item_count(run, [batch], across_ranks=False)
                loss, outputs = forward_loss(run, model, batch, n, across_ranks=False)
                loss = loss.detach().mean()
                logits = tuple(v for k, v in outputs.items() if k not in ignore + ["loss"]) \
                    if isinstance(outputs, dict) else outputs[1:]
            else:
                loss, outputs = None, model(**batch)
                logits = tuple(v for k, v in outputs.items() if k not in ignore) if isinstance(outputs, dict) else outputs
        if loss is not None:
            losses.add(acc.gather_for_metrics(loss.repeat(batch_size)))
        if loss_only:
            continue
        logits = nested_detach(logits)
        logits = logits[0] if len(logits) == 1 else logits
        if labels is not None:
            labels = acc.pad_across_processes(labels, dim=1, pad_index=-100)
        logits = acc.pad_across_processes(logits, dim=1, pad_index=-100)
        if run.preprocess_logits_for_metrics is not None:
            logits = run.preprocess_logits_for_metrics(logits, labels)
        preds.add(acc.gather_for_metrics(logits))
        if labels is not None:
            labels_all.add(acc.gather_for_metrics(labels))
    all_losses, all_preds, all_labels = losses.get_arrays(), preds.get_arrays(), labels_all.get_arrays()
    num_samples = len(loader.dataset) if hasattr(loader.dataset, "__len__") else seen
    metrics = {}
    if run.compute_metrics is not None and all_preds is not None and all_labels is not None:
        metrics = run.compute_metrics(EvalPrediction(predictions=all_preds, label_ids=all_labels))
    metrics = denumpify_detensorize(metrics or {})
    if isinstance(all_losses, np.ndarray):
        finite = np.isfinite(all_losses)
        if cfg.logging_nan_inf_filter and finite.any():
            all_losses = all_losses[finite]
        metrics[f"{prefix}_loss"] = all_losses.mean().item()
    metrics = {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}
    total_batch = cfg.per_device_eval_batch_size * acc.num_processes
    metrics.update(speed_metrics(prefix, start, num_samples=num_samples,
                                 num_steps=math.ceil(num_samples / total_batch)))
    return metrics
