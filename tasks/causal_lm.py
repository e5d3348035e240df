"""Causal-LM pre-training or fine-tuning, packed or padded. No training logic: it builds what the loop trains.

Packing concatenates documents into block_size rows. Each document restarts its position_ids at 0 and no
attention_mask is passed, so transformers builds a block-diagonal causal mask from the position_ids (sdpa/eager;
varlen kernels for flash attention; this needs use_cache=False, which the loop sets for training and
evaluation as Trainer does): no token attends across a document boundary. The first token of every
document is labelled -100, so no loss term predicts one document from another. Padded mode keeps one document
per row. Both modes train on exactly the same targets (tested).

`group_texts` instead joins the documents into one stream (each ends with the end-of-document token) and cuts it into
block_size rows, as transformers' run_clm.py (`group_texts`) and llm.c do: positions run 0..block_size-1 in every row,
every token is a target, and attention crosses document boundaries. The remainder shorter than a row at the end of
each map batch is dropped, as in run_clm.py.
"""

from __future__ import annotations

import math
import os
import sysconfig
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

IGNORE = -100


@dataclass
class Task(DataSource):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained causal LM (fine-tuning)."}
    )
    model_type: str = field(
        default="gpt2", metadata={"help": "Architecture for training from scratch (with model_config)."}
    )
    model_config: dict | None = field(
        default=None, metadata={"help": "Config overrides for training from scratch (JSON object)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (default: the model's); 'bytes' = byte-level, no files."}
    )
    text_source: str | None = field(
        default=None, metadata={"help": "'stdlib': this Python's standard-library sources (offline everywhere)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training row."})
    packing: bool = field(
        default=True, metadata={"help": "Pack documents into full rows (False: one padded document per row)."}
    )
    group_texts: bool = field(
        default=False,
        metadata={
            "help": "Join the documents into one stream cut into block_size rows (run_clm.py's group_texts, llm.c): "
            "no position restarts, attention crosses documents. Needs packing true."
        },
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Held-out share when there is no validation split."}
    )
    max_docs: int | None = field(default=None, metadata={"help": "Use at most this many documents (stdlib source)."})


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255), 256 = end of document. Needs no files, so it works offline everywhere."""

    vocab_size, eos_token_id, pad_token_id = 257, 256, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace")) + [self.eos_token_id]


def stdlib_documents(max_docs=None) -> list[str]:
    """Python's standard-library .py files, sorted by path: text that exists on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    docs = []
    for p in sorted(paths):
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(text)
        if max_docs and len(docs) >= max_docs:
            break
    return docs


def pack(docs: list[list[int]], block_size: int, pad_id: int) -> dict:
    """Greedy packing of token lists into rows; positions restart per document; doc-first tokens get label -100."""
    rows = {"input_ids": [], "position_ids": [], "labels": []}
    ids, pos, lab = [], [], []

    def flush():
        if not ids:
            return
        n = block_size - len(ids)  # pad the last row with a separate pseudo-document that has no targets
        rows["input_ids"].append(ids + [pad_id] * n)
        rows["position_ids"].append(pos + list(range(n)))
        rows["labels"].append(lab + [IGNORE] * n)

    for doc in docs:
        start = 0
        while start < len(doc):
            room = block_size - len(ids)
            piece = doc[start : start + room]
            ids += piece
            pos += list(range(len(piece)))
            lab += [IGNORE] + piece[1:]  # a row-or-document start is never a target
            start += len(piece)
            if len(ids) == block_size:
                flush()
                ids, pos, lab = [], [], []
    flush()
    return rows


def group_texts(docs: list[list[int]], block_size: int) -> dict:
    """run_clm.py's group_texts: the documents (each already ending with the end-of-document token) joined and cut
    into block_size rows; the remainder shorter than a row is dropped. Labels are the inputs (the model shifts)."""
    stream = [t for doc in docs for t in doc]
    rows = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return {"input_ids": rows, "labels": [list(r) for r in rows]}


def pad_collator(pad_id: int):
    """One document per row: right-pad input_ids (pad_id), labels (-100) and attention_mask (0)."""

    def collate(features):
        n = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            k = n - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [pad_id] * k)
            out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * k)
            out["labels"].append(list(f["labels"]) + [IGNORE] * k)
        return {key: torch.tensor(v) for key, v in out.items()}

    return collate


def token_nll(logits, labels):
    """Per row: (sum of next-token NLL, number of targets). Keeps eval memory at 2 numbers a row."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)
    return torch.stack([nll.sum(-1), (targets != IGNORE).sum(-1).to(nll.dtype)], dim=-1)


def perplexity(eval_pred):
    """Token-weighted perplexity over the whole eval set."""
    total = np.asarray(eval_pred.predictions).reshape(-1, 2).sum(0)
    return {"perplexity": float(math.exp(min(total[0] / max(total[1], 1), 50)))}


def build(task: Task, config) -> dict:
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_text_source(task)
    check_hub(task)
    if task.block_size < 2:  # a row needs an input and a target; 0 made packing loop forever
        raise LoopError(f"block_size must be >= 2 tokens, got {task.block_size}")
    if not 0 < task.validation_split_percentage < 100:
        raise LoopError(f"validation_split_percentage must be between 1 and 99, got {task.validation_split_percentage}")
    if task.group_texts and not task.packing:
        raise LoopError("group_texts joins documents into packed rows; set packing true (or group_texts false)")
    if task.max_docs is not None and task.max_docs < 1:
        raise LoopError(f"max_docs must be >= 1 (or unset for all), got {task.max_docs}")
    # ----------------------------------------------------------------- tokenizer
    tok_name = task.tokenizer_name or task.model_name_or_path
    if tok_name in (None, "bytes"):
        tokenizer, processing_class = ByteTokenizer(), None
        encode, eos, pad, vocab = tokenizer.encode, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size
    else:
        tokenizer = processing_class = from_pretrained(AutoTokenizer, tok_name)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        vocab = len(tokenizer)

        def encode(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])

    # ----------------------------------------------------------------- model
    if task.model_name_or_path:
        model = from_pretrained(AutoModelForCausalLM, task.model_name_or_path, dtype=torch.float32)
    else:
        overrides = dict(task.model_config or {})
        overrides.setdefault("vocab_size", vocab)
        overrides.setdefault(
            "n_positions" if task.model_type == "gpt2" else "max_position_embeddings", max(task.block_size, 128)
        )
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            overrides.setdefault(k, eos if k != "pad_token_id" else pad)
        try:
            model_config = AutoConfig.for_model(task.model_type, **overrides)
        except (ValueError, TypeError) as e:
            raise LoopError(f"model_type={task.model_type!r} with model_config {overrides}: {e}") from None
        model = AutoModelForCausalLM.from_config(model_config)
    positions = usable_positions(model)
    if positions and task.block_size > positions:  # else an index error deep in the first forward
        raise LoopError(
            f"block_size {task.block_size} is longer than the model's {positions} positions; use "
            f"--block_size {positions} or less"
        )
    # ----------------------------------------------------------------- data
    if task.text_source == "stdlib":
        docs = stdlib_documents(task.max_docs)
        held = max(1, len(docs) * task.validation_split_percentage // 100)
        step = max(len(docs) // held, 2)
        raw = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"text": [d for i, d in enumerate(docs) if i % step != step - 1]}),
                "validation": datasets.Dataset.from_dict(
                    {"text": [d for i, d in enumerate(docs) if i % step == step - 1]}
                ),
            }
        )
    else:
        with main_process_first(config):
            raw = load_raw(task, "causal_lm")
            if "validation" not in raw:
                split = raw["train"].train_test_split(
                    test_size=task.validation_split_percentage / 100, seed=config.seed
                )
                raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    for name, ds in raw.items():
        if len(ds) == 0:
            raise LoopError(f"the {name} split has no documents; check the data files")
        check_columns(ds, [task.text_column], name)

    block = task.block_size

    def tokenize_pack(batch):
        toks = [encode(t) for t in batch[task.text_column] if t]
        return pack(toks, block, pad)

    def tokenize_one(batch):
        ids = [encode(t)[:block] for t in batch[task.text_column] if t]
        return {"input_ids": ids, "labels": ids}

    def tokenize_group(batch):
        return group_texts([encode(t) for t in batch[task.text_column] if t], block)

    fn = tokenize_group if task.group_texts else tokenize_pack if task.packing else tokenize_one
    # the columns' types given, as datasets would infer them (input_ids narrowed to int32, its rule for that column):
    # inferring them walks every token in Python, most of the default job's start-up
    columns = ("input_ids", "position_ids", "labels") if fn is tokenize_pack else ("input_ids", "labels")
    features = datasets.Features(
        {c: datasets.Sequence(datasets.Value("int32" if c == "input_ids" else "int64")) for c in columns}
    )
    out = {}
    with main_process_first(config):  # the other ranks read the main process's cache (file-backed data)
        for split, ds in raw.items():
            out[split] = ds.map(
                fn,
                batched=True,
                num_proc=task.preprocessing_num_workers,
                remove_columns=ds.column_names,
                features=features,
                desc=f"tokenizing {split}",
            )
    train = subsample(out["train"], task.max_train_samples)
    val = subsample(out["validation"], task.max_eval_samples)
    if len(train) == 0:
        raise LoopError("tokenization left no training rows; check text_column and the data")
    if task.group_texts and len(val) == 0 and getattr(config, "eval_strategy", "no") != "no":
        raise LoopError(
            f"group_texts left the validation split no full row of {block} tokens (the remainder is dropped); "
            "lower --block_size, raise --validation_split_percentage or set --eval_strategy no"
        )
    collator = None if task.packing else pad_collator(pad)
    if task.packing:
        from transformers import default_data_collator

        collator = default_data_collator
    return dict(
        model=model,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        processing_class=processing_class,
        compute_metrics=perplexity,
        preprocess_logits_for_metrics=token_nll,
    )


__all__ = ["Task", "build", "pack", "group_texts", "pad_collator", "ByteTokenizer", "stdlib_documents"]
