"""A job: one flat YAML mapping plus `--field value` overrides -> (TrainConfig, task module, task options).

`task:` picks the task module (a built-in name, a dotted module or a .py file; see tasks/__init__.py). TrainConfig
fields and the task's own fields sit side by side. Every command that takes a job file (train, compare, evaluate)
reads it here, so they all accept the same tasks and options. Mistakes raise one-line `LoopError`s.
"""

from __future__ import annotations

import dataclasses
import os
import typing

from .config import REFUSED, TrainConfig, coerce
from .errors import LoopError, closest

DEFAULT_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks", "configs", "default.yaml")
DEFAULT_TASK = "causal_lm"


def parse_overrides(argv: list[str]) -> dict:
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise LoopError(f"unexpected argument {arg!r}; options look like --name value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --bf16
        out[name] = value
        i += 1
    return out


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise LoopError(f"config file {path} does not exist; check the path (examples are in tasks/configs/)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LoopError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise LoopError(f"config file {path} must be a mapping of field: value")
    return data


def task_module(name: str):
    from . import tasks

    return tasks.get(name)


def task_fields(module) -> dict:
    return {f.name: f for f in dataclasses.fields(module.Task)}


def job_values(argv: list[str]) -> dict:
    """The job file's values with the command line's overrides on top (`config` and `task` included)."""
    overrides = parse_overrides(argv)
    path = overrides.pop("config", None)
    # without a job file: the default job, unless another task is named (its fields would not fit that task)
    values = (
        load_yaml(path)
        if path
        else load_yaml(DEFAULT_JOB)
        if overrides.get("task", DEFAULT_TASK) == DEFAULT_TASK
        else {}
    )
    values.update(overrides)
    return values


def build_job(argv: list[str]):
    """(TrainConfig, task module, task options) from --config and overrides; one clear line on any mistake."""
    return job_from_values(job_values(argv))


def job_from_values(values: dict):
    values = dict(values)
    module = task_module(values.pop("task", DEFAULT_TASK))
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tfields = task_fields(module)
    unknown = [k for k in values if k not in train_fields and k not in tfields]
    if unknown:
        k = unknown[0]
        if k in REFUSED:
            raise LoopError(f"--{k} is a TrainingArguments option the loop does not support: {REFUSED[k]}")
        raise LoopError(
            f"unknown option --{k}{closest(k, list(train_fields) + list(tfields))}; "
            "`loop train --help` lists every option"
        )
    hints = typing.get_type_hints(module.Task)
    task_values = {k: coerce(k, v, hints[k]) for k, v in values.items() if k in tfields}
    config = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    try:
        task = module.Task(**task_values)
    except (TypeError, ValueError) as e:
        raise LoopError(f"the options of task {module.__name__} are invalid: {e}") from None
    return config, module, task


def build_task(module, task, config) -> dict:
    """Call the task's build() under the run's seed, so a model built from a config starts from the same weights in
    every process (and in Trainer's run under `loop compare`). Returns loop.train's keyword arguments."""
    from transformers import set_seed

    set_seed(config.seed)
    built = module.build(task, config)
    if not isinstance(built, dict):
        raise LoopError(
            f"{module.__name__}.build() returned {type(built).__name__}; it must return a dict of "
            "loop.train keyword arguments (model, train_dataset, ...)"
        )
    return built


def evaluate_built(config, model, built: dict, metric_key_prefix: str = "eval") -> dict:
    """loop.evaluate of `model` on a built task's eval_dataset, with the task's collator, metrics and loss."""
    from .evaluation import evaluate

    keys = (
        "data_collator",
        "compute_metrics",
        "processing_class",
        "preprocess_logits_for_metrics",
        "compute_loss_func",
    )
    task_parts = {k: built.get(k) for k in keys}
    return evaluate(config, model, built["eval_dataset"], **task_parts, metric_key_prefix=metric_key_prefix)
