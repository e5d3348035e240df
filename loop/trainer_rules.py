"""Trainer's default rules: the values TrainingArguments fills in when they are left unset, applied to a TrainConfig
before it is validated, so that the loop runs what Trainer would run with the same arguments. Nothing here refuses
anything (validation.py does); nothing here reads `fast` (fast.py decides what it turns on, per run)."""

from __future__ import annotations


def apply(config) -> None:
    if config.eval_strategy == "steps" and not config.eval_steps:
        config.eval_steps = config.logging_steps  # eval_steps defaults to logging_steps
    if (config.load_best_model_at_end or config.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy")) and (
        config.metric_for_best_model is None
    ):
        config.metric_for_best_model = "loss"
    if config.greater_is_better is None and config.metric_for_best_model is not None:
        config.greater_is_better = not config.metric_for_best_model.endswith("loss")
    if config.torch_compile_backend is not None or config.torch_compile_mode is not None:
        config.torch_compile = True  # naming a compile backend or mode turns compilation on
    if config.early_stopping_patience is not None and config.metric_for_best_model is None:
        config.metric_for_best_model, config.greater_is_better = "loss", False  # (the loop's EarlyStopping too)
    accumulation = (config.accelerator_config or {}).get("gradient_accumulation_kwargs") or {}
    if "num_steps" in accumulation and config.gradient_accumulation_steps == 1:
        config.gradient_accumulation_steps = accumulation["num_steps"]  # Trainer's rule (validation: the other case)
    if config.use_cpu:
        config.dataloader_pin_memory = False
