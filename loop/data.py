"""DataLoaders built the way Trainer builds them, so that the same seed gives the same batches.

The train order comes from accelerate's SeedableRandomSampler (seed + epoch), which makes a data position
(epoch, micro-batches consumed) enough to resume: `skip_first_batches` then skips by index, loading nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
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

    return (
        DataCollatorWithPadding(processing_class)
        if isinstance(processing_class, PreTrainedTokenizerBase)
        else default_data_collator
    )


class _DropColumns:
    """Collator wrapper that drops keys the model cannot take (Trainer's RemoveColumnsCollator)."""

    def __init__(self, collator, keep):
        self.collator, self.keep = collator, set(keep)

    def __call__(self, features):
        return self.collator(
            [{k: v for k, v in f.items() if k in self.keep} if isinstance(f, dict) else f for f in features]
        )


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
                f"{type(model).__name__}.forward; rename the columns or pass remove_unused_columns=False"
            )
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep]), collator
    return dataset, _DropColumns(collator, keep)


def _init_worker(worker_id, num_workers=None, rank=None, ignore_sigterm=False):
    """A loader worker's start: Trainer's per-rank seeding (training loaders), and under enable_jit_checkpoint no death
    by SIGTERM (Slurm or `pkill -f` signal every process of the job: the main process must live to save the
    checkpoint, and it ends its workers itself)."""
    if ignore_sigterm:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if num_workers is not None:
        from transformers import set_seed

        set_seed(torch.initial_seed() % 2**32 + num_workers * rank)


def pins(config) -> bool:
    """dataloader_pin_memory where there is an accelerator to copy to (on a CPU run pinning does nothing but warn)."""
    return config.dataloader_pin_memory and not config.use_cpu and torch.accelerator.is_available()


def _loader_kwargs(config, collator, batch_size):
    kw = dict(
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=config.dataloader_num_workers,
        pin_memory=pins(config),
        persistent_workers=config.dataloader_persistent_workers,
        multiprocessing_context=config.dataloader_multiprocessing_context,
        prefetch_factor=config.dataloader_prefetch_factor,
    )
    if config.enable_jit_checkpoint:
        kw["worker_init_fn"] = partial(_init_worker, ignore_sigterm=True)
    if "in_order" in inspect.signature(DataLoader.__init__).parameters:
        kw["in_order"] = config.dataloader_in_order
    return kw


def given_loader(accelerator, loader):
    """A loader handed to the loop (a Trainer subclass's get_*_dataloader): a torch DataLoader the Accelerator has
    not prepared is prepared (device placement, sharding across processes), as Trainer's own are; any other iterable
    of batches is used as it is."""
    if isinstance(loader, torch.utils.data.DataLoader) and not hasattr(loader, "total_batch_size"):
        return accelerator.prepare(loader)
    return loader


def train_loader(config, dataset, collator, accelerator, table=None, model_input_name="input_ids"):
    """The training DataLoader, prepared; with a DeviceTable (fast.resolve decides) its batches are cut on the device."""
    kw = _loader_kwargs(config, collator, config.per_device_train_batch_size)
    if table is not None:  # same sampler over positions; batches are cut from the table on the device
        dataset = Positions(len(dataset))
        kw.update(collate_fn=table, num_workers=0, pin_memory=False, persistent_workers=False, prefetch_factor=None)
    if not isinstance(dataset, IterableDataset):
        if config.train_sampling_strategy == "sequential":
            sampler = SequentialSampler(dataset)
        elif config.train_sampling_strategy == "group_by_length":
            from transformers.trainer_pt_utils import LengthGroupedSampler

            lengths = (
                dataset[config.length_column_name]
                if getattr(dataset, "column_names", None) and config.length_column_name in dataset.column_names
                else None
            )
            sampler = LengthGroupedSampler(
                config.per_device_train_batch_size * config.gradient_accumulation_steps,
                dataset=dataset,
                lengths=lengths,
                model_input_name=model_input_name,
            )
        else:
            sampler = RandomSampler(dataset)
        kw.update(
            sampler=sampler,
            drop_last=config.dataloader_drop_last,
            worker_init_fn=partial(
                _init_worker,
                num_workers=config.dataloader_num_workers,
                rank=accelerator.process_index,
                ignore_sigterm=config.enable_jit_checkpoint,
            ),
        )
    loader = accelerator.prepare(DataLoader(dataset, **kw))
    loader.device_table = table
    return loader


def eval_loader(config, dataset, collator, accelerator):
    kw = _loader_kwargs(config, collator, config.per_device_eval_batch_size)
    if not isinstance(dataset, IterableDataset):
        kw.update(
            sampler=SequentialSampler(dataset) if accelerator.num_processes <= 1 else None,
            drop_last=config.dataloader_drop_last,
        )
    return accelerator.prepare(DataLoader(dataset, **kw))


# ------------------------------------------------------------------------------------------------------------------
# dataset_on_device: the training set collated once and kept on the accelerator. A loader over positions keeps the
# sampler (so the order, the RNG draws and resume are the default loader's); its collate_fn cuts the batch out of the
# table with one small index copy and an index_select on the device. No worker processes, no per-batch pickling, no
# pinned staging, no host-to-device copy of the batch: for small models the loader's host time is most of the step.

DEVICE_TABLE_MAX_BYTES = 2 * 2**30


class Positions(torch.utils.data.Dataset):
    """Stands in for the dataset in the loader: item i is the position i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i

    def __getitems__(self, positions):
        return list(positions)


def narrowest(values: torch.Tensor) -> torch.Tensor:
    """`values` in the narrowest integer dtype that holds them (token ids of a byte or BERT vocabulary in 1 or 2 bytes,
    masks and labels in 1): the table is most of what `fast` adds to a small model's memory. Floats stay as they are."""
    if values.dtype not in (torch.int64, torch.int32, torch.int16) or values.numel() == 0:
        return values
    low, high = int(values.min()), int(values.max())
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        if torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max:
            return values.to(dtype) if dtype.itemsize < values.element_size() else values
    return values


class DeviceTable:
    """collate_fn over positions: the rows of the collated table, sequence columns cut to the width the collator would
    have padded this batch to (the longest row, rounded up to its pad_to_multiple_of; computed on the host). The
    columns are kept narrow (`narrowest`, on the host before they move) and each batch is cast back to the collator's
    dtypes when it is cut: the same tensors, a quarter to an eighth of the memory."""

    def __init__(self, columns, lengths, multiple, seq_keys, device=None):
        self.dtypes = {k: v.dtype for k, v in columns.items()}  # the collator's
        self.columns = {k: narrowest(v).to(device) for k, v in columns.items()}
        self.lengths, self.multiple, self.seq_keys = lengths, multiple, seq_keys

    def __call__(self, positions):
        rows = torch.as_tensor(positions)
        index = rows.to(next(iter(self.columns.values())).device, non_blocking=True)
        width = None
        if self.lengths is not None:
            width = -(-int(self.lengths[rows].max()) // self.multiple) * self.multiple  # host tensors: no sync
        return {
            k: (v[:, :width] if width is not None and k in self.seq_keys else v)
            .index_select(0, index)
            .to(self.dtypes[k])
            for k, v in self.columns.items()
        }

    def chunks(self, size: int = 4096):
        """The whole table in the collator's dtypes, `size` rows at a time (to count over every row)."""
        n = next(iter(self.columns.values())).shape[0]
        for start in range(0, n, size):
            yield {k: v[start : start + size].to(self.dtypes[k]) for k, v in self.columns.items()}


def on_device_table(config, dataset, collator, device, main_input="input_ids", wanted=True, required=None):
    """A DeviceTable for `dataset` when `wanted` (dataset_on_device, or `fast`: fast.resolve decides), else None.
    `required` (asked for explicitly; default: config.dataset_on_device): a dataset it cannot serve is refused with the
    reason; otherwise it is skipped."""
    if not wanted:
        return None
    table, why = (
        (None, "group_by_length samples by the dataset's lengths")
        if config.train_sampling_strategy == "group_by_length"
        else _build_table(dataset, collator, device, main_input)
    )
    if table is None and (config.dataset_on_device if required is None else required):
        raise LoopError(f"dataset_on_device: {why}; set dataset_on_device false")
    return table


def _nbytes(batch) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values())


def _too_big(nbytes, verb) -> str:
    return f"the collated set {verb} {nbytes / 2**30:.1f} GiB (more than {DEVICE_TABLE_MAX_BYTES / 2**30:.0f})"


def is_map_style(dataset) -> bool:
    return not isinstance(dataset, IterableDataset) and has_length(dataset)


def _fetcher(dataset):
    """rows(indices) for a map-style dataset: its own __getitems__ where it has one."""
    return (
        (lambda idx: dataset.__getitems__(idx))
        if hasattr(dataset, "__getitems__")
        else (lambda idx: [dataset[i] for i in idx])
    )


def collated_chunks(dataset, collator, size: int = 256):
    """A map-style dataset collated `size` rows at a time, in order (a generator)."""
    fetch, n = _fetcher(dataset), len(dataset)
    for start in range(0, n, size):
        yield collator(fetch(list(range(start, min(start + size, n)))))


def _build_table(dataset, collator, device, main_input):
    if not is_map_style(dataset):
        return None, "the training set is iterable (no length); only a map-style dataset can be kept on the device"
    n = len(dataset)
    fetch = _fetcher(dataset)
    try:
        estimate = _nbytes(collator(fetch(list(range(min(n, 256)))))) * n / min(n, 256)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return None, f"the collator's batch is not a dict of tensors ({type(e).__name__}: {e})"
    if estimate > DEVICE_TABLE_MAX_BYTES:  # before collating everything on the host
        return None, _too_big(estimate, "would take about")
    rows = fetch(list(range(n)))
    try:
        full = collator(rows)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return None, f"the collator cannot batch the whole set at once ({type(e).__name__}: {e})"
    full = dict(full) if isinstance(full, Mapping) else full  # a BatchEncoding (tokenizer.pad) is a Mapping
    if not isinstance(full, dict) or not all(
        torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n for v in full.values()
    ):
        return None, "the collator's batch is not a dict of tensors with one row per example"
    size = _nbytes(full)
    if size > DEVICE_TABLE_MAX_BYTES:
        return None, _too_big(size, "takes")
    width = full[main_input].shape[1] if main_input in full and full[main_input].dim() >= 2 else None
    seq_keys = {k for k, v in full.items() if v.dim() >= 2 and v.shape[1] == width}
    lengths, multiple = None, 1
    if width is not None and isinstance(rows[0], Mapping) and hasattr(rows[0].get(main_input), "__len__"):
        lengths = torch.tensor([len(r[main_input]) for r in rows])
        if collator([rows[int(lengths.argmin())]])[main_input].shape[1] == width:
            lengths = None  # padded to a fixed width: every batch is the full width
    if lengths is not None:  # padded to the batch's longest row
        multiple = (
            getattr(collator, "pad_to_multiple_of", None)
            or getattr(getattr(collator, "collator", None), "pad_to_multiple_of", None)
            or 1
        )
    table = DeviceTable(full, lengths, multiple, seq_keys, device)
    # the table must give exactly the collator's batches: checked on a few batches of random rows of every length
    g = torch.Generator().manual_seed(0)
    for count in (1, 7, 32, min(n, 256)):
        pick = torch.randperm(n, generator=g)[:count].tolist()
        want, got = dict(collator([rows[i] for i in pick])), table(pick)
        if want.keys() != got.keys() or not all(
            want[k].dtype == got[k].dtype and want[k].shape == got[k].shape and torch.equal(want[k], got[k].cpu())
            for k in want
        ):
            if width is not None and not isinstance(rows[0], Mapping):
                return None, (
                    f"the batches vary in width and the rows are not dicts holding a `{main_input}` sequence to measure"
                )
            return None, "the collator's batches depend on more than the rows' lengths (checked on sample batches)"
    return table, None
