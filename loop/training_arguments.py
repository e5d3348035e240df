"""The TrainingArguments bridge: TrainConfig from and to `transformers.TrainingArguments`, the fields the loop refuses
(with what to do instead), and the coverage table `loop fields` prints (docs/reference/training_arguments.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

from .errors import LoopError


def from_training_arguments(cls, args, **loop_fields):
    """Mirror `args`; refuse (naming it) any field the loop does not implement that is set to a non-default value.

    Loop-only features stay off (parity mode: telemetry keys are not added) unless passed in `loop_fields`.
    """
    defaults = _default_training_arguments()
    for name, rule in REFUSED.items():
        if not hasattr(args, name):
            continue
        if not _same(getattr(args, name), defaults.get(name)):
            raise LoopError(f"TrainingArguments.{name}={getattr(args, name)!r} is not supported by the loop: {rule}")
    values = {}
    for f in fields(cls):
        if f.metadata["group"] != "trainer" or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        value = getattr(value, "value", value)  # enums -> their string
        if dataclasses.is_dataclass(value):  # accelerator_config: an AcceleratorConfig -> its fields; none if default
            value = None if value == type(value)() else dataclasses.asdict(value)
        values[f.name] = value
    # transformers >= 5.20 names it activation_checkpointing; gradient_checkpointing mirrors it
    if getattr(args, "activation_checkpointing", None):
        values["gradient_checkpointing"] = True
        values["gradient_checkpointing_kwargs"] = getattr(args, "activation_checkpointing_kwargs", None)
    values["report_to"] = list(args.report_to) if args.report_to else "none"
    if isinstance(getattr(args, "debug", None), list):  # TrainingArguments parses "a b" into [DebugOption, ...]
        values["debug"] = " ".join(getattr(o, "value", o) for o in args.debug)
    if values.get("disable_tqdm") is None:
        values["disable_tqdm"] = False
    values.update({"telemetry": False, **loop_fields})
    return cls(**values)


def to_training_arguments(config, **overrides):
    """The TrainingArguments that make Trainer run this configuration."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {
        f.name: getattr(config, f.name) for f in fields(config) if f.metadata["group"] == "trainer" and f.name in known
    }
    kwargs["report_to"] = config.report_to or "none"
    if "activation_checkpointing" in known:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# TrainingArguments fields the loop does not implement, with what to do instead. Setting any of them to a
# non-default value in from_training_arguments raises; they have no TrainConfig field, so the CLI refuses them too.
REFUSED = {
    "optim_target_modules": "GaLore/APOLLO-style optimizers are not implemented",
    "use_liger_kernel": "Liger kernels are not integrated; `fused_linear_cross_entropy` is the loop's own fused loss (no extra dependency)",
    "liger_kernel_config": "Liger kernels are not integrated",
    "trackio_space_id": "trackio Space options are not wired; use report_to=trackio with its own env vars",
    "trackio_bucket_id": "trackio Space options are not wired; use report_to=trackio with its own env vars",
    "trackio_static_space_id": "trackio Space options are not wired; use report_to=trackio with its own env vars",
    "push_to_hub": "push the saved output_dir with huggingface_hub yourself",
    "hub_token": "Hub upload is not implemented",
    "hub_private_repo": "Hub upload is not implemented",
    "hub_model_id": "Hub upload is not implemented",
    "hub_strategy": "Hub upload is not implemented",
    "hub_always_push": "Hub upload is not implemented",
    "hub_revision": "Hub upload is not implemented",
    "parallelism_config": "tensor/context parallelism is not implemented; use a launch config for DDP/FSDP/DeepSpeed",
    "fsdp": "use `accelerate launch --config_file launch_configs/fsdp2.yaml`",
    "fsdp_config": "use `accelerate launch --config_file launch_configs/fsdp2.yaml`",
    "deepspeed": "use `accelerate launch --config_file launch_configs/deepspeed_zero2.yaml` (or zero3)",
}

# Mirrored TrainingArguments fields whose behaviour has something worth knowing.
NOTES = {
    "do_train": "inert in Trainer too: `loop train` always trains",
    "do_eval": "inert in Trainer too: evaluation follows eval_strategy",
    "do_predict": "inert in Trainer too",
    "local_rank": "set by the launcher; read through accelerate",
    "resume_from_checkpoint": "also accepts 'latest'; inert in Trainer, honoured by `loop train`",
    "report_to": "handed to accelerate's trackers",
    "gradient_checkpointing": "named activation_checkpointing in transformers >= 5.20; both map here",
    "activation_checkpointing": "mapped to gradient_checkpointing",
    "activation_checkpointing_kwargs": "mapped to gradient_checkpointing_kwargs",
    "restore_callback_states_from_checkpoint": "the loop always restores callback state (state_dict) for exact resume",
    "log_level": "applied to transformers' logger, as Trainer's get_process_log_level",
    "log_on_each_node": "decides which processes take log_level; metrics.jsonl and trackers are written by rank 0",
    "enable_jit_checkpoint": "saves and stops at the next step boundary; raises `loop.Preempted` (CLI exit 143) "
    "instead of returning",
    "skip_memory_metrics": "the loop's telemetry reports peak device memory instead of Trainer's memory tracker",
    "logging_nan_inf_filter": "applied on device, without a host sync",
    "train_sampling_strategy": "random, sequential, group_by_length (not batch_rebalance)",
    "optim": "adamw_torch_fused, adamw_torch, sgd, adafactor, adagrad, rmsprop",
    "eval_accumulation_steps": "accepted; predictions are moved to the CPU per batch anyway",
    "debug": "underflow_overflow (transformers' own hook, removed when training ends); not tpu_metrics_debug",
    "save_on_each_node": "a folder shared between nodes is refused; resume 'latest' agrees on a step whole on every "
    "node; not with FSDP/DeepSpeed",
    "ddp_backend": "handed to accelerate's process group; nccl on a CPU run, or a backend this torch lacks, is refused",
    "tf32": "set on the CUDA backends; an error without an Ampere+ GPU, as in Trainer",
}
INERT = {
    "do_train",
    "do_eval",
    "do_predict",
    "local_rank",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
}


def _same(a, b) -> bool:
    a, b = getattr(a, "value", a), getattr(b, "value", b)
    if dataclasses.is_dataclass(a) and b is None:  # __post_init__ turns a None default into its config object
        try:
            b = type(a)()
        except TypeError:
            return False
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return dataclasses.asdict(a) == dataclasses.asdict(b)
    return a == b or (a in (None, [], {}, "") and b in (None, [], {}, ""))


def _default_training_arguments() -> dict:
    """TrainingArguments' declared defaults, read from its fields. Not an instance: building one resets accelerate's
    process-wide state (AcceleratorState._reset_state), which under `torchrun`/`accelerate launch` would leave the
    run's Accelerator thinking it is alone."""
    from transformers import TrainingArguments

    return {
        f.name: f.default
        if f.default is not dataclasses.MISSING
        else f.default_factory()
        if f.default_factory is not dataclasses.MISSING
        else None
        for f in dataclasses.fields(TrainingArguments)
    }


def coverage() -> list[tuple[str, str, str]]:
    """(field, status, note) for every field of the installed TrainingArguments: mirrored, mirrored*, or refused."""
    from transformers import TrainingArguments

    from .config import TrainConfig

    ours = {f.name for f in fields(TrainConfig)}
    rows = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        if f.name in REFUSED:
            rows.append((f.name, "refused", REFUSED[f.name]))
        elif f.name in ours or f.name in INERT:
            rows.append((f.name, "mirrored*" if f.name in NOTES else "mirrored", NOTES.get(f.name, "")))
        else:
            rows.append((f.name, "refused", "not implemented"))
    return rows
