"""What both tasks share: loading text data offline-friendly, loading Hub models with a clear offline error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import nn

from loop.errors import LoopError


@dataclass
class DataSource:
    """Where a task's text comes from and how much of it is used (the fields load_raw and subsample read)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name (e.g. glue, imdb)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. sst2)."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local train file (txt/csv/tsv/json/jsonl/parquet)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train set to this many rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the eval set to this many rows."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})


EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def check_text_source(task):
    """text_source and data files (or a Hub dataset) both answer "what is trained on": refuse both rather than
    silently train on one of them (the default job sets text_source stdlib)."""
    if task.text_source not in (None, "stdlib"):
        raise LoopError(
            f"text_source={task.text_source!r} is unknown; use 'stdlib' or give --train_file/--dataset_name"
        )
    named = [f"--{k} {getattr(task, k)}" for k in ("train_file", "validation_file", "dataset_name") if getattr(task, k)]
    if task.text_source == "stdlib" and named:
        raise LoopError(
            f"text_source stdlib (the job's built-in text) and {', '.join(named)} both name the data; add "
            f"--text_source none to train on yours, or drop {named[0].split()[0]}"
        )


def check_hub(task):
    """Offline, a Hub id fails at once with one line naming every local-path option, instead of after the Hub client's
    retries (about 30 s). The Hub counts as unreachable when HF_HUB_OFFLINE is set or a connection to it fails within
    3 s; a model or tokenizer already in the local Hub cache still loads from there."""
    named = {k: getattr(task, k, None) for k in ("model_name_or_path", "tokenizer_name", "dataset_name")}
    if getattr(task, "train_file", None) or getattr(task, "validation_file", None):
        named.pop("dataset_name")  # local files are read instead of the Hub dataset (load_raw)
    remote = {k: v for k, v in named.items() if v and v != "bytes" and not os.path.exists(v)}
    if not remote or _hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    missing = [
        f"--{k} {v}"
        for k, v in remote.items()
        if k == "dataset_name"
        or not isinstance(
            try_to_load_from_cache(v, "config.json" if k == "model_name_or_path" else "tokenizer_config.json"), str
        )
    ]
    if missing:
        raise LoopError(
            f"the Hub cannot be reached (offline?) and {', '.join(missing)} {'point' if len(missing) > 1 else 'points'} "
            "there; use local copies: "
            "--model_name_or_path FOLDER (config.json, weights, tokenizer), --tokenizer_name FOLDER, "
            "--train_file FILE --validation_file FILE (csv/tsv/json/jsonl/parquet/txt)"
        )


def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


def usable_positions(model):
    """How many tokens a row may have (None if the config does not say): n_positions or max_position_embeddings, less
    what RoBERTa-style models reserve (their position ids start after the padding index: 514 embeddings hold 512)."""
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    for name, module in model.named_modules():
        if (
            positions
            and name.endswith("position_embeddings")
            and isinstance(module, nn.Embedding)
            and module.padding_idx is not None
        ):
            return module.num_embeddings - module.padding_idx - 1
    return positions


def load_raw(task, what: str):
    """A DatasetDict with 'train' (and 'validation' if given) from local files or a Hub dataset."""
    import datasets

    if task.train_file or task.validation_file:
        files = {k: v for k, v in (("train", task.train_file), ("validation", task.validation_file)) if v}
        for split, path in files.items():
            if not os.path.isfile(path):
                raise LoopError(
                    f"--{split if split == 'train' else 'validation'}_file {path} does not exist; check the path"
                )
        exts = {os.path.splitext(p)[1].lower() for p in files.values()}
        if len(exts) != 1 or next(iter(exts)) not in EXTENSIONS:
            raise LoopError(
                f"data files must share one of the extensions {', '.join(EXTENSIONS)}; got {', '.join(exts)}"
            )
        ext = next(iter(exts))
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        return datasets.load_dataset(EXTENSIONS[ext], data_files=files, **kwargs)
    if not task.dataset_name:
        raise LoopError(f"the {what} task needs data: --train_file/--validation_file (local) or --dataset_name (Hub)")
    try:
        return datasets.load_dataset(task.dataset_name, task.dataset_config_name)
    except (ConnectionError, OSError, ValueError) as e:
        if (
            "offline" in str(e).lower()
            or "connect" in str(e).lower()
            or "couldn't" in str(e).lower()
            or "resolve" in str(e).lower()
            or isinstance(e, ConnectionError)
        ):
            raise LoopError(
                f"cannot reach the Hub for dataset {task.dataset_name!r} (offline?); point at local files "
                "with --train_file FILE --validation_file FILE (csv/tsv/json/parquet/txt)"
            ) from None
        raise


def from_pretrained(cls, name: str, **kwargs):
    """cls.from_pretrained(name) with one clear line when the Hub cannot be reached or the path is wrong."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as e:
        where = "local path" if os.path.exists(name) else "Hub id"
        raise LoopError(
            f"cannot load {name!r} ({where}): {str(e).splitlines()[0][:160]}; if offline, pass a local "
            "folder with --model_name_or_path /path/to/model (config.json + weights + tokenizer)"
        ) from None


def check_columns(ds, columns, what):
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise LoopError(
            f"the {what} data has no column {missing[0]!r} (it has {', '.join(ds.column_names)}); "
            f"set the column name, e.g. --text_column {ds.column_names[0]}"
        )


def main_process_first(config):
    """datasets work (loading, tokenisation) runs on each node's main process first; the other ranks then read its
    cache instead of repeating the work and racing on the files, as transformers' examples do. One process: no-op.
    The process state is made with the run's use_cpu, which the loop's Accelerator then shares."""
    from accelerate import PartialState

    return PartialState(cpu=config.use_cpu).local_main_process_first()


def subsample(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None else ds
