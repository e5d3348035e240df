"""Validation, one function a component: each refuses what it cannot run with one line naming the problem and the
fix, before any model is touched. check() runs them all, after trainer_rules.apply has filled in Trainer's defaults."""

from __future__ import annotations

import math
import re
from dataclasses import fields

from .errors import LoopError, closest


def bad(msg):
    raise LoopError(msg)


def check(config) -> None:
    for component in (
        choices_and_numbers,
        batches_and_length,
        optimizer_and_schedule,
        param_groups,
        precision,
        logging_evaluation_and_saving,
        data_loading,
        debugging,
        trackers,
        loop_features,
    ):
        component(config)


def choices_and_numbers(config):
    for f in fields(config):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed and value is not None and value not in allowed:
            bad(
                f"{f.name}={value!r} is not supported{closest(str(value), allowed)}; choose one of: {', '.join(allowed)}"
            )
    if nan := [
        f.name
        for f in fields(config)
        if isinstance(getattr(config, f.name), float) and math.isnan(getattr(config, f.name))
    ]:
        bad(f"{nan[0]} is nan; give it a number")


def batches_and_length(config):
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            bad(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps == 0 or (config.max_steps < 0 and config.num_train_epochs <= 0):
        bad("nothing to train: set max_steps > 0 or num_train_epochs > 0")
    for name in ("seed", "data_seed"):
        if getattr(config, name) is not None and not 0 <= getattr(config, name) < 2**32:
            bad(f"{name} must be in [0, 2**32 - 1] (numpy's range), got {getattr(config, name)}")


def optimizer_and_schedule(config):
    from .config import OPTIMIZERS

    if config.learning_rate < 0:
        bad(f"learning_rate must be >= 0, got {config.learning_rate}")
    if config.warmup_steps < 0:
        bad(f"warmup_steps must be >= 0 (an int, or a ratio < 1), got {config.warmup_steps}")
    if config.warmup_steps >= 1 and config.warmup_steps != int(config.warmup_steps):
        bad(f"warmup_steps={config.warmup_steps}: use an integer number of steps, or a ratio below 1")
    if config.max_grad_norm < 0:
        bad(f"max_grad_norm must be >= 0 (0 disables clipping), got {config.max_grad_norm}")
    if not 0 <= config.label_smoothing_factor < 1:
        bad(f"label_smoothing_factor must be in [0, 1), got {config.label_smoothing_factor}")
    if config.neftune_noise_alpha is not None and config.neftune_noise_alpha < 0:
        bad(f"neftune_noise_alpha must be >= 0 (unset disables NEFTune), got {config.neftune_noise_alpha}")
    if config.optim in OPTIMIZERS:
        from .optim import optim_args

        optim_args(config.optim, config.optim_args)  # malformed, not a number, or a key the optimizer does not take
    if config.lr_scheduler_type == "greedy":
        import transformers.optimization

        if not hasattr(transformers.optimization, "GreedyLR"):
            bad("lr_scheduler_type='greedy' needs a transformers with GreedyLR: pip install -U transformers")
    if config.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy") and config.eval_strategy == "no":
        bad(
            f"lr_scheduler_type='{config.lr_scheduler_type}' steps on the eval metric: set eval_strategy to steps "
            "or epoch"
        )


def param_groups(config):

    example = '[{"pattern": "classifier", "learning_rate": 1e-4}]'
    if config.param_groups is None:
        return
    if not isinstance(config.param_groups, list):
        raise LoopError(f"param_groups must be a list of mappings, e.g. --param_groups '{example}'")
    names = set()
    for i, e in enumerate(config.param_groups):
        if not isinstance(e, dict) or not isinstance(e.get("pattern"), str):
            raise LoopError(
                f"param_groups[{i}] = {e!r} needs a `pattern` (a regular expression over parameter "
                f"names), e.g. --param_groups '{example}'"
            )
        unknown = set(e) - {"pattern", "learning_rate", "weight_decay", "name"}
        if unknown:
            k = sorted(unknown)[0]
            raise LoopError(
                f"param_groups[{i}] has an unknown key {k!r}"
                f"{closest(k, ('pattern', 'learning_rate', 'weight_decay', 'name'))}; "
                "keys are pattern, learning_rate, weight_decay, name"
            )
        try:
            re.compile(e["pattern"])
        except re.error as err:
            raise LoopError(
                f"param_groups[{i}] pattern {e['pattern']!r} is not a valid regular expression ({err})"
            ) from None
        for key in ("learning_rate", "weight_decay"):
            if key in e:
                try:
                    e[key] = float(e[key])
                except (TypeError, ValueError):
                    raise LoopError(f"param_groups[{i}] {key}={e[key]!r} is not a number") from None
                if e[key] < 0:
                    raise LoopError(f"param_groups[{i}] {key} must be >= 0, got {e[key]}")
        name = e.get("name", e["pattern"])
        if name in names:
            raise LoopError(f"param_groups has two entries named {name!r}; give each a distinct `name`")
        names.add(name)


def precision(config):
    from .config import compile_records_graphs

    if config.fp16 and config.bf16:
        bad("fp16 and bf16 are both set: choose one mixed-precision mode")
    if config.fp16_full_eval and config.bf16_full_eval:
        bad("fp16_full_eval and bf16_full_eval are both set: choose one evaluation dtype")
    if config.torch_compile_backend is not None:
        from accelerate.utils import DynamoBackend

        backends = [b.value.lower() for b in DynamoBackend if b.value != "NO"]
        if config.torch_compile_backend.lower() not in backends:
            bad(
                f"torch_compile_backend={config.torch_compile_backend!r} is not a backend"
                f"{closest(config.torch_compile_backend.lower(), backends)}; choose one of: {', '.join(backends)}"
            )
    if config.cuda_graph_step and (conflict := compile_records_graphs(config)):
        bad(conflict)
    if config.attention_backends is not None:
        unknown = [n for n in config.attention_backends.split(",") if n not in ("flash", "efficient", "cudnn", "math")]
        if unknown or not config.attention_backends:
            bad(
                f"attention_backends={config.attention_backends!r}: {', '.join(unknown) or 'empty'} is not a kernel; "
                "write a comma list of flash, efficient, cudnn, math"
            )


def logging_evaluation_and_saving(config):
    if unknown := [x for x in config.include_for_metrics if x not in ("inputs", "loss")]:
        bad(f"include_for_metrics: {', '.join(map(repr, unknown))} is not an option; list inputs and/or loss")
    if config.logging_strategy == "steps" and config.logging_steps <= 0:
        bad("logging_strategy='steps' needs logging_steps > 0")
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(config, name)
        if value is not None and value > 1 and value != int(value):
            bad(f"{name}={value}: use an integer number of steps, or a ratio below 1")
    if config.eval_strategy == "steps" and config.eval_steps <= 0:
        bad("eval_strategy='steps' needs eval_steps > 0")
    if config.save_strategy == "steps" and config.save_steps <= 0:
        bad("save_strategy='steps' needs save_steps > 0")
    if config.save_total_limit is not None and config.save_total_limit < 1:
        bad(f"save_total_limit must be >= 1 or unset, got {config.save_total_limit}")
    if config.load_best_model_at_end:
        if config.eval_strategy == "no":
            bad("load_best_model_at_end needs evaluation: set eval_strategy to steps or epoch")
        if config.save_strategy == "no":
            bad("load_best_model_at_end needs checkpoints: set save_strategy to steps, epoch or best")
        if config.save_strategy not in ("best", config.eval_strategy):
            bad(
                f"load_best_model_at_end needs save_strategy ({config.save_strategy}) to match eval_strategy "
                f"({config.eval_strategy}), or save_strategy=best"
            )
        if (
            config.save_strategy == "steps"
            and config.eval_strategy == "steps"
            and config.save_steps >= 1
            and config.eval_steps >= 1
            and config.save_steps % config.eval_steps != 0
        ):
            bad(
                f"load_best_model_at_end needs save_steps ({config.save_steps}) to be a multiple of eval_steps ({config.eval_steps})"
            )
    if config.save_strategy == "best" and config.eval_strategy == "no":
        bad("save_strategy='best' needs evaluation: set eval_strategy to steps or epoch")
    if config.save_strategy == "best" and config.metric_for_best_model is None:  # Trainer's refusal, in its words
        bad(
            "`args.metric_for_best_model` must be provided when using 'best' save_strategy: set metric_for_best_model "
            "(e.g. loss)"
        )
    if config.torch_empty_cache_steps is not None and config.torch_empty_cache_steps < 1:
        bad(f"torch_empty_cache_steps must be >= 1 (or unset), got {config.torch_empty_cache_steps}")


ACCELERATOR_CONFIG = (
    "split_batches",
    "dispatch_batches",
    "even_batches",
    "use_seedable_sampler",
    "non_blocking",
    "gradient_accumulation_kwargs",
    "use_configured_state",
)
ACCUMULATION_KWARGS = ("num_steps", "adjust_scheduler", "sync_with_dataloader", "sync_each_batch")


def data_loading(config):
    acfg = config.accelerator_config or {}
    if unknown := [k for k in acfg if k not in ACCELERATOR_CONFIG]:
        bad(f"accelerator_config: unknown setting {unknown[0]!r}{closest(unknown[0], ACCELERATOR_CONFIG)}")
    if acfg.get("use_configured_state"):
        bad(
            "accelerator_config use_configured_state: the loop makes each run's Accelerator from its own settings; "
            "drop it (configure accelerate with accelerate launch --config_file)"
        )
    accumulation = acfg.get("gradient_accumulation_kwargs") or {}
    if unknown := [k for k in accumulation if k not in ACCUMULATION_KWARGS]:
        bad(f"accelerator_config gradient_accumulation_kwargs: unknown setting {unknown[0]!r}")
    if "num_steps" in accumulation and accumulation["num_steps"] != config.gradient_accumulation_steps:
        bad(  # Trainer's refusal, in its words
            "The `AcceleratorConfig`'s `num_steps` is set but `gradient_accumulation_steps` is greater than 1 in the "
            "passed `TrainingArguments`: set one of them"
        )
    if config.dataloader_num_workers < 0:
        bad(f"dataloader_num_workers must be >= 0, got {config.dataloader_num_workers}")
    if config.dataloader_prefetch_factor is not None and config.dataloader_num_workers == 0:
        bad("dataloader_prefetch_factor needs dataloader_num_workers > 0")


def debugging(config):
    for option in config.debug.split():
        if option == "tpu_metrics_debug":
            bad("debug tpu_metrics_debug prints TPU metrics and the loop does not run on TPUs; drop it")
        if option != "underflow_overflow":
            bad(
                f"debug={option!r} is not a debug option{closest(option, ('underflow_overflow',))}; "
                "the loop has one: underflow_overflow"
            )


def trackers(config):
    from .config import TRACKERS

    for tracker in config.report_to:
        if tracker not in TRACKERS and tracker != "all":
            bad(
                f"report_to={tracker!r} is not a known tracker{closest(tracker, TRACKERS)}; use one of {', '.join(TRACKERS)} or none"
            )


def loop_features(config):
    if config.sharded_optimizer and config.fp16:
        bad("sharded_optimizer with fp16 is not supported (the loss scaler steps the whole optimizer); use bf16")
    if config.sharded_optimizer and config.optim not in (
        "adamw_torch",
        "adamw_torch_fused",
        "sgd",
        "adagrad",
        "rmsprop",
    ):
        bad(
            f"sharded_optimizer needs an elementwise optimizer (adamw_torch, adamw_torch_fused, sgd, adagrad, "
            f"rmsprop); {config.optim} is not one: change optim or set sharded_optimizer false"
        )
    if not 0 <= config.ema_decay < 1:
        bad(f"ema_decay must be in [0, 1) (0 disables the EMA), got {config.ema_decay}")
    if config.ema_start_step < 0:
        bad(f"ema_start_step must be >= 0, got {config.ema_start_step}")
    if config.early_stopping_patience is not None and config.eval_strategy == "no":
        bad("early_stopping_patience needs evaluation: set eval_strategy to steps or epoch")
