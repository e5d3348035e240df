"""DataLoaders built the way Trainer builds them, so that the same seed gives the same batches.

The train order comes from accelerate's SeedableRandomSampler (seed + epoch), which makes a data position
(epoch, micro-batches consumed) enough to resume: `skip_first_batches` then skips by index, loading nothing.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from .errors import LoopError


def has_length(dataset) -> bool:
    try:
        return len(dataset) is not None
    except (TypeError, AttributeError, NotImplementedError):
        return False


def signature_columns(model, label_names) -> list[str]:
    """Inputs the model's forward accepts, plus the label columns (Trainer's _set_signature_columns)."""
    cols = list(inspect.signature(model.forward).parameters.keys())
    return cols + list(set(["label", "label_ids"] + list(label_names)))


def default_label_names(model) -> list[str]:
    from transformers.utils import find_labels

    return find_labels(model.__class__)


def default_collator(data_collator, processing_class=None):
    """Trainer's default: pad with the tokenizer if one is given, else stack (default_data_collator)."""
    if data_collator is not None:
        return data_collator
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

    return DataCollatorWithPadding(processing_class) if isinstance(processing_class, PreTrainedTokenizerBase) \
        else default_data_collator


class _DropColumns:
    """Collator wrapper that drops keys the model cannot take (Trainer's RemoveColumnsCollator)."""

    def __init__(self, collator, keep):
        self.collator, self.keep = collator, set(keep)

    def __call__(self, features):
        return self.collator([{k: v for k, v in f.items() if k in self.keep} if isinstance(f, dict) else f
                              for f in features])


def prepare_dataset(dataset, collator, model, config, label_names, what: str):
    """Drop unused columns as Trainer does; refuse an empty dataset or one with no usable column."""
    if dataset is None:
        return None, collator
    if has_length(dataset) and len(dataset) == 0:
        raise LoopError(f"the {what} dataset is empty; give it at least one example")
    if not config.remove_unused_columns:
        return dataset, collator
    keep = signature_columns(model, label_names)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        usable = [c for c in dataset.column_names if c in keep]
        if not usable:
            raise LoopError(
                f"no column of the {what} dataset ({', '.join(dataset.column_names)}) is an input of "
                f"{type(model).__name__}.forward; rename the columns or pass remove_unused_columns=False")
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep]), collator
    return dataset, _DropColumns(collator, keep)


def _seed_worker(worker_id, num_workers, rank):
    from transformers import set_seed

    set_seed(torch.initial_seed() % 2**32 + num_workers * rank)


def _loader_kwargs(config, collator, batch_size):
    kw = dict(batch_size=batch_size, collate_fn=collator, num_workers=config.dataloader_num_workers,
              pin_memory=config.dataloader_pin_memory, persistent_workers=config.dataloader_persistent_workers,
              multiprocessing_context=config.dataloader_multiprocessing_context,
              prefetch_factor=config.dataloader_prefetch_factor)
    if "in_order" in inspect.signature(DataLoader.__init__).parameters:
        kw["in_order"] = config.dataloader_in_order
    return kw


def train_loader(config, dataset, collator, accelerator, model_input_name="input_ids"):
    kw = _loader_kwargs(config, collator, config.per_device_train_batch_size)
    if not isinstance(dataset, IterableDataset):
        if config.train_sampling_strategy == "sequential":
            sampler = SequentialSampler(dataset)
        elif config.train_sampling_strategy == "group_by_length":
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = dataset[config.length_column_name] if getattr(dataset, "column_names", None) and \
                config.length_column_name in dataset.column_names else None
            sampler = LengthGroupedSampler(config.per_device_train_batch_size * config.gradient_accumulation_steps,
                                           dataset=dataset, lengths=lengths, model_input_name=model_input_name)
        else:
            sampler = RandomSampler(dataset)
        kw.update(sampler=sampler, drop_last=config.dataloader_drop_last,
                  worker_init_fn=partial(_seed_worker, num_workers=config.dataloader_num_workers,
                                         rank=accelerator.process_index))
    return accelerator.prepare(DataLoader(dataset, **kw))


def eval_loader(config, dataset, collator, accelerator):
    kw = _loader_kwargs(config, collator, config.per_device_eval_batch_size)
    if not isinstance(dataset, IterableDataset):
        kw.update(sampler=SequentialSampler(dataset) if accelerator.num_processes <= 1 else None,
                  drop_last=config.dataloader_drop_last)
    return accelerator.prepare(DataLoader(dataset, **kw))
