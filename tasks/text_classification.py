"""Sequence classification (single sentences or pairs) with a pretrained encoder. No training logic here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loop.errors import LoopError

from .common import DataSource, check_columns, from_pretrained, load_raw, main_process_first, subsample


@dataclass
class Task(DataSource):
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local folder of a pretrained encoder."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the evaluation split (imdb: test)."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text (first sentence of a pair)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with the second sentence of a pair."})
    label_column: str = field(default="label", metadata={"help": "Column with integer labels."})
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes (default: from the data)."})
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Dynamic padding to a multiple of this."})


def accuracy_f1(eval_pred):
    """Accuracy and macro-F1 (numpy only)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for c in np.unique(np.concatenate([labels, preds])):
        tp = np.sum((preds == c) & (labels == c))
        fp, fn = np.sum((preds == c) & (labels != c)), np.sum((preds != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((preds == labels).mean()), "f1": float(np.mean(f1s))}


def build(task: Task, config) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    if not task.model_name_or_path:
        raise LoopError("text_classification needs --model_name_or_path (a Hub id or a local model folder)")
    with main_process_first(config):
        raw = load_raw(task, "text_classification")
    if task.validation_split != "validation" and task.validation_split in raw:
        raw["validation"] = raw[task.validation_split]
    for split in ("train", "validation"):
        if split not in raw:
            raise LoopError(f"no {split} split; give --{split}_file or a dataset with a {split} split")
        if len(raw[split]) == 0:
            raise LoopError(f"the {split} data is empty; check the file")
        check_columns(raw[split], [task.text_column, task.text_pair_column, task.label_column], split)
    labels = sorted(set(raw["train"][task.label_column]))
    if any(not isinstance(x, (int, np.integer)) for x in labels):
        raise LoopError(f"column {task.label_column!r} must hold integer class ids (got e.g. {labels[0]!r})")
    num_labels = task.num_labels or int(max(labels)) + 1
    tokenizer = from_pretrained(AutoTokenizer, task.tokenizer_name or task.model_name_or_path)
    model = from_pretrained(AutoModelForSequenceClassification, task.model_name_or_path, num_labels=num_labels,
                            dtype=torch.float32)  # fp32 master weights; bf16/fp16 come from autocast

    def tokenize(batch):
        args = (batch[task.text_column],) + ((batch[task.text_pair_column],) if task.text_pair_column else ())
        enc = tokenizer(*args, truncation=True, max_length=task.max_length)
        enc["labels"] = batch[task.label_column]
        return enc

    with main_process_first(config):  # the other ranks read the main process's cache
        out = {split: raw[split].map(tokenize, batched=True, num_proc=task.preprocessing_num_workers,
                                     remove_columns=raw[split].column_names, desc=f"tokenizing {split}")
               for split in ("train", "validation")}
        if config.train_sampling_strategy == "group_by_length":
            out = {k: v.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
                   for k, v in out.items()}
    return dict(model=model, train_dataset=subsample(out["train"], task.max_train_samples),
                eval_dataset=subsample(out["validation"], task.max_eval_samples),
                data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=task.pad_to_multiple_of),
                processing_class=tokenizer, compute_metrics=accuracy_f1)
