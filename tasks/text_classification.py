"""Sequence classification (single sentences or pairs) with a pretrained encoder. No training logic here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loop.errors import LoopError

from .common import (
    DataSource,
    check_columns,
    check_hub,
    check_text_source,
    from_pretrained,
    load_raw,
    main_process_first,
    subsample,
    usable_positions,
)


@dataclass
class Task(DataSource):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained encoder."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the evaluation split (imdb: test)."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text (first sentence of a pair)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with the second sentence of a pair."})
    label_column: str = field(default="label", metadata={"help": "Column with integer labels."})
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes (default: from the data)."})
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Dynamic padding to a multiple of this."})
    model_type: str = field(
        default="bert",
        metadata={"help": "Architecture for training from scratch (with model_config, no model_name_or_path)."},
    )
    model_config: dict | None = field(
        default=None, metadata={"help": "Config overrides for training from scratch (JSON object)."}
    )
    text_source: str | None = field(
        default=None,
        metadata={
            "help": "'stdlib': lines of this Python's standard library, labelled 1 if they mention self (offline everywhere; for benchmarks)."
        },
    )
    max_docs: int | None = field(
        default=None, metadata={"help": "Use at most this many stdlib files (text_source stdlib)."}
    )


class ByteTokenizer:
    """[CLS]=1, UTF-8 bytes + 3, [SEP]=2, padding 0: a tokenizer without files (text_source stdlib, benchmarks)."""

    pad_token_id = 0

    def __init__(self, max_length):
        self.max_length = max_length

    def __call__(self, texts, truncation=True, max_length=None):
        ids = [[1] + [b + 3 for b in t.encode("utf-8", errors="replace")][: self.max_length - 2] + [2] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


def pad_collator(multiple):
    def collate(features):
        n = max(len(f["input_ids"]) for f in features)
        n = -(-n // multiple) * multiple if multiple else n
        pad = lambda x: list(x) + [0] * (n - len(x))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(f["input_ids"]) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"]) for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    collate.pad_to_multiple_of = multiple  # read by dataset_on_device, as on DataCollatorWithPadding
    return collate


def stdlib_lines(max_docs):
    """Non-blank lines of stdlib sources, split into train/validation (every 20th line held out)."""
    import datasets

    from .causal_lm import stdlib_documents

    lines = [x.strip() for doc in stdlib_documents(max_docs) for x in doc.splitlines() if len(x.strip()) > 8]
    rows = {"sentence": lines, "label": [int("self" in x) for x in lines]}
    full = datasets.Dataset.from_dict(rows)
    held = [i for i in range(len(lines)) if i % 20 == 19]
    keep = [i for i in range(len(lines)) if i % 20 != 19]
    return datasets.DatasetDict({"train": full.select(keep), "validation": full.select(held)})


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

    if not task.model_name_or_path and task.model_config is None:
        raise LoopError(
            "text_classification needs --model_name_or_path (a Hub id or a local model folder), or "
            "--model_config to train one from scratch"
        )
    check_text_source(task)
    check_hub(task)
    if task.max_length < 2:
        raise LoopError(f"max_length must be >= 2 tokens, got {task.max_length}")
    if task.pad_to_multiple_of is not None and task.pad_to_multiple_of < 1:
        raise LoopError(f"pad_to_multiple_of must be >= 1 (or unset), got {task.pad_to_multiple_of}")
    with main_process_first(config):
        raw = stdlib_lines(task.max_docs) if task.text_source == "stdlib" else load_raw(task, "text_classification")
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
    seen = labels + sorted(set(raw["validation"][task.label_column]))
    lowest, highest = int(min(seen)), int(max(seen))
    if lowest < 0 or highest >= num_labels:  # else an index error inside the loss at the first such batch
        fix = (
            "fix the labels (an unlabelled test split holds -1; evaluate on a labelled split)"
            if lowest < 0
            else f"set --num_labels {highest + 1}, or fix the labels"
        )
        raise LoopError(
            f"column {task.label_column!r} holds class ids from {lowest} to {highest}, but they must be "
            f"0..num_labels-1 (num_labels {num_labels}): {fix}"
        )
    if task.tokenizer_name == "bytes" or (task.tokenizer_name is None and not task.model_name_or_path):
        tokenizer, collator = ByteTokenizer(task.max_length), pad_collator(task.pad_to_multiple_of)
    else:
        tokenizer = from_pretrained(AutoTokenizer, task.tokenizer_name or task.model_name_or_path)
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=task.pad_to_multiple_of)
    if task.model_name_or_path:
        model = from_pretrained(
            AutoModelForSequenceClassification, task.model_name_or_path, num_labels=num_labels, dtype=torch.float32
        )  # fp32 master weights; bf16/fp16 come from autocast
    else:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.for_model(task.model_type, num_labels=num_labels, **(task.model_config or {}))
        except (ValueError, TypeError) as e:
            raise LoopError(f"model_type={task.model_type!r} with model_config {task.model_config}: {e}") from None
        model = AutoModelForSequenceClassification.from_config(model_config)

    def tokenize(batch):
        args = (batch[task.text_column],) + ((batch[task.text_pair_column],) if task.text_pair_column else ())
        enc = tokenizer(*args, truncation=True, max_length=task.max_length)
        enc["labels"] = batch[task.label_column]
        return enc

    with main_process_first(config):  # the other ranks read the main process's cache
        out = {
            split: raw[split].map(
                tokenize,
                batched=True,
                num_proc=task.preprocessing_num_workers,
                remove_columns=raw[split].column_names,
                desc=f"tokenizing {split}",
            )
            for split in ("train", "validation")
        }
        if config.train_sampling_strategy == "group_by_length":
            out = {
                k: v.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True) for k, v in out.items()
            }
    positions = usable_positions(model)
    longest = max(max(map(len, ds["input_ids"])) for ds in out.values())
    if positions and longest > positions:  # else an index error deep in the first forward that meets such a row
        raise LoopError(
            f"the longest tokenized row has {longest} tokens, more than the model's {positions} positions; "
            f"use --max_length {positions} or less"
        )
    return dict(
        model=model,
        train_dataset=subsample(out["train"], task.max_train_samples),
        eval_dataset=subsample(out["validation"], task.max_eval_samples),
        data_collator=collator,
        processing_class=None if isinstance(tokenizer, ByteTokenizer) else tokenizer,
        compute_metrics=accuracy_f1,
    )
