"""`loop.train`: the whole training run, top to bottom.

    set seed -> Accelerator -> data -> optimizer/scheduler -> prepare -> (resume) -> epochs of windows:
        window = next W micro-batches;  grad_norm = optimizer_step(run, window)   (step.py)
        log / evaluate / save when due                                             (Trainer's DefaultFlowCallback)
    -> final record -> best model -> save_model (+ EMA) -> callbacks' on_train_end

Host-device syncs happen only where a record is written (log boundaries, evaluation, checkpoints).
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from .callbacks import Callback, fire
from .config import TrainConfig
from .data import default_label_names, eval_loader, has_length, prepare_dataset, train_loader
from .errors import LoopError
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, is_plateau
from .state import TrainState
from .step import optimizer_step
from .telemetry import Telemetry


@dataclass
class TrainResult:
    global_step: int
    training_loss: float
    metrics: dict
    log_history: list = field(default_factory=list)
    output_dir: str = ""


class Run:
    """Everything a step, an evaluation or a callback may need, in one place."""

    def __init__(self, config, model, accelerator, callbacks, compute_metrics, preprocess_logits_for_metrics):
        self.config, self.model, self.accelerator = config, model, accelerator
        self.unwrapped = model
        self.callbacks = callbacks
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        self.state = TrainState()
        self.optimizer = self.scheduler = self.ema = None
        self.tr_loss = torch.tensor(0.0, device=accelerator.device)  # summed window losses since the last log
        self.last_lr = None
        self.epoch_start_rng = None
        self.telemetry = None
        # Trainer's rule: a model takes num_items_in_batch if it says so, or if its forward has **kwargs
        if hasattr(model, "accepts_loss_kwargs"):
            self.accepts_loss_kwargs = bool(model.accepts_loss_kwargs)
        else:
            params = inspect.signature(model.forward).parameters.values()
            self.accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        self.shifts_labels, self.smoothing_shifts_labels = _label_shift_rules(model)
        self.label_names = list(config.label_names) if config.label_names is not None else default_label_names(model)
        self.label_smoother = None
        if config.label_smoothing_factor != 0:
            from transformers.trainer_pt_utils import LabelSmoother

            self.label_smoother = LabelSmoother(epsilon=config.label_smoothing_factor)

    def count_batch(self, batch):
        if self.telemetry is not None:
            self.telemetry.count(batch)


def _label_shift_rules(model):
    """(count items over labels[..., 1:], label smoother shifts labels): Trainer's two causal-LM rules."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False, False
    counts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and \
        not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    smooth = model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if hasattr(model, "_get_name") else False
    return counts, smooth


def _make_accelerator(config):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, GradientAccumulationPlugin
    from accelerate.utils import InitProcessGroupKwargs
    from datetime import timedelta

    ddp = {"find_unused_parameters": config.ddp_find_unused_parameters
           if config.ddp_find_unused_parameters is not None else not config.gradient_checkpointing}
    for name in ("bucket_cap_mb", "broadcast_buffers", "static_graph"):
        if getattr(config, f"ddp_{name}") is not None:
            ddp[name] = getattr(config, f"ddp_{name}")
    kwargs = {}
    if config.torch_compile:
        from accelerate.utils import TorchDynamoPlugin

        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend=config.torch_compile_backend or "inductor",
                                                    mode=config.torch_compile_mode)
    # The loop does gradient accumulation itself (whole windows), so the Accelerator accumulates over 1 step.
    return Accelerator(
        mixed_precision=config.mixed_precision, cpu=config.use_cpu,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.data_seed,
                                                  even_batches=True, split_batches=False),
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],
        log_with=config.report_to or None, project_dir=config.output_dir, **kwargs)


def _seed(config):
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(config.seed) if config.full_determinism else set_seed(config.seed)


def train(config: TrainConfig, model, train_dataset, eval_dataset=None, data_collator=None, compute_metrics=None,
          callbacks=None, processing_class=None, resume_from_checkpoint=None,
          preprocess_logits_for_metrics=None) -> TrainResult:
    """Train `model` on `train_dataset` as Trainer would with the same configuration. See README for the API."""
    # ---------------------------------------------------------------- check inputs before anything is touched
    if not isinstance(config, TrainConfig):
        raise LoopError(f"config must be a loop.TrainConfig, got {type(config).__name__}; "
                        "build one with TrainConfig(...) or TrainConfig.from_training_arguments(args)")
    if not isinstance(model, nn.Module):
        raise LoopError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if train_dataset is None:
        raise LoopError("train_dataset is required")
    if not has_length(train_dataset) and config.max_steps <= 0:
        raise LoopError("the train dataset has no length; set max_steps > 0")
    if config.eval_strategy != "no" and eval_dataset is None:
        raise LoopError(f"eval_strategy={config.eval_strategy!r} needs an eval_dataset; pass one or set eval_strategy=no")
    if config.eval_on_start and eval_dataset is None:
        raise LoopError("eval_on_start needs an eval_dataset")
    callbacks = list(callbacks or [])
    if config.early_stopping_patience is not None:
        from .callbacks import EarlyStopping

        callbacks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_threshold))
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise LoopError(f"callback {cb!r} is not a loop.Callback; subclass loop.Callback")
    resume_from_checkpoint = resume_from_checkpoint if resume_from_checkpoint is not None else config.resume_from_checkpoint
    resume_path = ckpt.resolve_resume(resume_from_checkpoint, config.output_dir)

    # ---------------------------------------------------------------- seed, accelerator, model, data
    _seed(config)  # before anything random, exactly where Trainer seeds
    if config.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    acc = _make_accelerator(config)
    if config.log_level != "passive" and acc.is_main_process:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.get_log_levels_dict()[config.log_level])
    if config.report_to:
        acc.init_trackers(config.run_name or config.project, config=_flat(config.to_dict()))
    if getattr(model, "config", None) is not None:
        model.config.use_cache = config.use_cache
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise LoopError(f"gradient_checkpointing needs a model with gradient_checkpointing_enable(); "
                            f"{type(model).__name__} has none")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
    model = model.to(acc.device)
    run = Run(config, model, acc, callbacks, compute_metrics, preprocess_logits_for_metrics)

    if data_collator is None:
        from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

        data_collator = DataCollatorWithPadding(processing_class) \
            if isinstance(processing_class, PreTrainedTokenizerBase) else default_data_collator
    train_ds, train_collate = prepare_dataset(train_dataset, data_collator, model, config, run.label_names, "train")
    eval_ds, eval_collate = prepare_dataset(eval_dataset, data_collator, model, config, run.label_names, "eval")
    main_input = getattr(model, "main_input_name", "input_ids")
    loader = train_loader(config, train_ds, train_collate, acc, main_input)
    evaluator = eval_loader(config, eval_ds, eval_collate, acc) if eval_ds is not None else None

    # ---------------------------------------------------------------- how long (Trainer's arithmetic)
    GA = config.gradient_accumulation_steps
    if has_length(loader):
        steps_in_epoch = len(loader)  # micro-batches per epoch on this rank
        if steps_in_epoch == 0:
            raise LoopError("the train dataset gives no batch (fewer examples than one batch with "
                            "dataloader_drop_last); lower the batch size or add data")
        updates_per_epoch = max(steps_in_epoch // GA + int(steps_in_epoch % GA > 0), 1)
        if config.max_steps > 0:
            max_steps = config.max_steps
            num_epochs = max_steps // updates_per_epoch + int(max_steps % updates_per_epoch > 0)
        else:
            max_steps = math.ceil(config.num_train_epochs * updates_per_epoch)
            num_epochs = math.ceil(config.num_train_epochs)
    else:
        max_steps, num_epochs, updates_per_epoch = config.max_steps, sys.maxsize, config.max_steps
        steps_in_epoch = max_steps * GA
    log_every, eval_every, save_every = (config.steps_for(k, max_steps) for k in ("logging", "eval", "save"))

    # ---------------------------------------------------------------- optimizer, schedule, prepare
    run.optimizer = build_optimizer(config, model)
    run.model, run.optimizer = acc.prepare(model, run.optimizer)
    run.unwrapped = acc.unwrap_model(run.model)
    run.scheduler = build_scheduler(config, run.optimizer, max_steps)
    if config.ema_decay > 0:
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise LoopError("ema_decay under FSDP/DeepSpeed is not supported yet: the EMA needs whole weights; "
                            "use a DDP launch config or set ema_decay 0")
        from .ema import EMA

        run.ema = EMA(run.unwrapped, config.ema_decay, config.ema_warmup, config.ema_start_step,
                      device="cpu" if config.ema_on_cpu else None)
    state = run.state
    state.max_steps = max_steps
    state.geometry = {"per_device_train_batch_size": config.per_device_train_batch_size, "gradient_accumulation_steps": GA,
                      "world_size": acc.num_processes,
                      "train_examples": len(train_ds) if has_length(train_ds) else None}

    # ---------------------------------------------------------------- resume
    saved_rng = None
    if resume_path is not None:
        saved = ckpt.read_state(resume_path)
        changed = {k: (saved.geometry.get(k), v) for k, v in state.geometry.items() if saved.geometry.get(k) != v}
        if changed and not config.allow_inexact_resume:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise LoopError(f"cannot resume {resume_path} exactly: {what}; restore those settings, or pass "
                            "--allow_inexact_resume true to accept an approximate data position")
        geometry = state.geometry
        run.state = state = saved
        state.geometry, state.max_steps = geometry, max_steps
        saved_rng = ckpt.load(run, resume_path)
        for cb in callbacks:
            if hasattr(cb, "load_state_dict") and type(cb).__name__ in state.callback_states:
                cb.load_state_dict(state.callback_states[type(cb).__name__])
        if changed:  # inexact: keep the epoch, restart its data
            state.batches_in_epoch = 0
    resumed = resume_path is not None
    start_step = state.global_step

    # ---------------------------------------------------------------- bookkeeping shared by the handlers below
    records = _Records(run, max_steps, start_step)
    run.telemetry = Telemetry(run, main_input)
    if acc.is_main_process:
        ckpt.clean_stale(config.output_dir)
    if resumed:
        records.out.note({"event": "resumed", "from": resume_path, "step": state.global_step})
    start_time = time.time()
    stop = fire(callbacks, "on_train_begin", run)
    grad_norm = None

    def log_loss():
        """A loss record: the one sync point of the training loop (log boundary)."""
        loss_sum = acc.gather(run.tr_loss).mean().item()
        run.tr_loss -= run.tr_loss  # Trainer resets this way (keeps nan visible)
        record = {"loss": loss_sum / (state.global_step - state.last_logged_step)}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm
        record["learning_rate"] = run.last_lr
        state.total_loss += loss_sum
        state.last_logged_step = state.global_step
        records.log(record, start_time, telemetry=True)

    def run_eval(on_start=False):
        metrics = evaluate(run, evaluator)
        records.log(metrics)
        stop_now = fire(callbacks, "on_evaluate", run, metrics)
        if run.ema is not None:
            run.ema.swap(run.unwrapped)  # EMA weights in; swapped back right after
            ema_metrics = evaluate(run, evaluator, prefix="eval_ema")
            run.ema.swap(run.unwrapped)
            records.log(ema_metrics)
            metrics = {**metrics, **ema_metrics}
        if is_plateau(run.scheduler) and not on_start:
            run.scheduler.step(_metric(config, metrics))
        return metrics, stop_now

    def log_eval_save(should_log, should_eval, should_save):
        """Trainer's _maybe_log_save_evaluate, in the same order."""
        nonlocal stop
        if should_log and state.global_step > state.last_logged_step:
            log_loss()
        if should_eval:
            metrics, stop_now = run_eval()
            stop = stop or stop_now
            value = _metric(config, metrics) if config.metric_for_best_model else None
            better = value is not None and (state.best_metric is None or
                                            (value > state.best_metric if config.greater_is_better else value < state.best_metric))
            if better:
                state.best_metric = value
                if config.save_strategy != "no":
                    state.best_global_step = state.global_step
            if config.save_strategy == "best":
                should_save = better
        if should_save:
            if config.metric_for_best_model is not None and state.best_global_step == state.global_step:
                # this checkpoint holds the best weights so far; recorded before saving so the saved state knows
                state.best_checkpoint = os.path.join(config.output_dir, f"{ckpt.PREFIX}{state.global_step}")
            path = ckpt.save(run)
            ckpt.rotate(config.output_dir, config.save_total_limit, keep=(state.best_checkpoint,))
            stop = fire(callbacks, "on_save", run, path) or stop

    if config.eval_on_start and not resumed:
        run_eval(on_start=True)

    # ---------------------------------------------------------------- the epochs
    for epoch in range(state.epoch_index, num_epochs):
        if stop or state.global_step >= max_steps:
            break
        state.epoch_index = epoch
        skip = state.batches_in_epoch if resumed and not config.ignore_data_skip else 0
        epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
        _set_epoch(epoch_loader, epoch)
        if resumed and saved_rng is not None and skip:
            ckpt.set_rng_state(saved_rng["epoch_start"])  # so iter() draws what it drew the first time
        elif resumed and saved_rng is not None:
            ckpt.set_rng_state(saved_rng)  # resuming at an epoch boundary: the state at save time
        run.epoch_start_rng = saved_rng["epoch_start"] if (resumed and skip and saved_rng) else ckpt.rng_state()
        batches = _started(epoch_loader)  # the loader's random draws happen here, under the epoch-start state
        if resumed and saved_rng is not None and skip:
            ckpt.set_rng_state(saved_rng)  # now continue from the saved random streams
        resumed, step = False, skip - 1
        remainder = steps_in_epoch % GA or GA
        for update in range(skip // GA, updates_per_epoch):
            window = []
            for _ in range(GA if update != updates_per_epoch - 1 else remainder):
                try:
                    window.append(next(batches))
                except StopIteration:
                    break
            if not window:
                break
            grad_norm = optimizer_step(run, window)
            step += len(window)
            state.batches_in_epoch = step + 1
            state.global_step += 1
            state.epoch = epoch + (step + 1) / steps_in_epoch
            records.out.advance()
            stop = fire(callbacks, "on_step_end", run) or stop
            if config.torch_empty_cache_steps and state.global_step % config.torch_empty_cache_steps == 0:
                from accelerate.utils.memory import clear_device_cache

                clear_device_cache()
            gs = state.global_step
            should_log = (gs == 1 and config.logging_first_step) or \
                (config.logging_strategy == "steps" and gs % log_every == 0)
            eval_due = config.eval_strategy == "steps" and config.eval_delay <= gs
            should_eval = eval_due and gs % eval_every == 0
            should_save = config.save_strategy == "steps" and save_every > 0 and gs % save_every == 0
            if gs >= max_steps:
                stop = True
                should_eval = should_eval or eval_due
                should_save = should_save or config.save_strategy == "steps"
            log_eval_save(should_log, should_eval, should_save)
            if stop:
                break
        if step < 0:
            warnings.warn(f"epoch {epoch} gave no batch; stopping at step {state.global_step}")
            stop = True
        # epoch end: the position moves to the next epoch before anything is saved
        state.epoch_index, state.batches_in_epoch = epoch + 1, 0
        log_eval_save(config.logging_strategy == "epoch",
                      config.eval_strategy == "epoch" and config.eval_delay <= state.epoch,
                      config.save_strategy == "epoch")

    # ---------------------------------------------------------------- finish
    return _finish(run, records, start_time, start_step, processing_class)


def _started(loader):
    """iter(loader) with its first batch already fetched: accelerate's loaders are lazy generators, and the
    worker seeds are drawn at the first next(). Fetching it now pins those draws to a known RNG state."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return iter(())
    return itertools.chain([first], it)


def _set_epoch(loader, epoch):
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def _metric(config, metrics):
    name = config.metric_for_best_model
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        raise LoopError(f"metric_for_best_model={name!r}: evaluation gave no {key!r} (it gave "
                        f"{', '.join(sorted(k for k in metrics if not k.endswith(('_runtime', '_per_second'))))}); "
                        "pick one of those")
    return metrics[key]


def _flat(d):
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


class _Records:
    """Appends records to log_history and sends them out (file, bar, trackers, callbacks)."""

    def __init__(self, run, max_steps, start_step):
        from .records import Records

        self.run = run
        self.out = Records(run.config, run.accelerator, max_steps, start_step)

    def log(self, logs: dict, start_time=None, telemetry=False):
        run, state = self.run, self.run.state
        logs = dict(logs)
        logs["epoch"] = state.epoch
        # reduces the step counters across ranks: a log-boundary sync
        logs.update(run.telemetry.record(start_time, loss_record=telemetry))
        record = {**logs, "step": state.global_step}
        state.log_history.append(record)
        self.out.write(record, state.global_step)
        fire(run.callbacks, "on_log", run, record)


def _finish(run, records, start_time, start_step, processing_class):
    from transformers.trainer_utils import speed_metrics

    acc, cfg, state = run.accelerator, run.config, run.state
    loss_sum = acc.gather(run.tr_loss).mean().item()
    state.total_loss += loss_sum
    steps_here = state.global_step - start_step
    # train_loss averages every step of the run, including those before a resume (the uninterrupted value)
    train_loss = state.total_loss / max(state.global_step, 0.001)
    total_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    metrics = speed_metrics("train", start_time, num_samples=total_batch * steps_here, num_steps=steps_here)
    run.telemetry.flush()
    metrics["total_flos"] = state.total_flos
    metrics["train_loss"] = train_loss
    records.log(metrics)
    if cfg.load_best_model_at_end and state.best_checkpoint and os.path.isdir(state.best_checkpoint):
        ckpt.load_weights(run.unwrapped, state.best_checkpoint)
    if cfg.save_total_limit == 1 and state.best_checkpoint and acc.is_main_process:
        # Trainer's rule: with a limit of 1 the newest was kept only while training could go on; keep the best
        for _, path in ckpt.list_checkpoints(cfg.output_dir):
            if os.path.abspath(path) != os.path.abspath(state.best_checkpoint):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
    save_model(run, processing_class)
    fire(run.callbacks, "on_train_end", run)
    records.out.close()
    if cfg.report_to:
        acc.end_training()
    acc.wait_for_everyone()
    return TrainResult(state.global_step, train_loss, metrics, state.log_history, cfg.output_dir)


def save_model(run, processing_class=None):
    """Save the final weights the way trainer.save_model() does, atomically; the EMA under ema/."""
    acc, cfg = run.accelerator, run.config
    out = cfg.output_dir
    tmp = os.path.join(out, ".tmp-final")
    weights = ckpt.strip_prefixes(acc.get_state_dict(run.model))
    ema_weights = None
    if run.ema is not None:
        run.ema.swap(run.unwrapped)
        ema_weights = ckpt.strip_prefixes(acc.get_state_dict(run.model))
        ema_weights = {k: v.clone() for k, v in ema_weights.items()}
        run.ema.swap(run.unwrapped)
    if acc.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_model(run.unwrapped, weights, tmp, acc)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(tmp)
        if ema_weights is not None:
            _write_model(run.unwrapped, ema_weights, os.path.join(tmp, "ema"), acc)
        for name in os.listdir(tmp):  # move into place; the weights go last
            if name not in ("model.safetensors", "ema"):
                _replace(os.path.join(tmp, name), os.path.join(out, name))
        for name in ("ema", "model.safetensors"):
            if os.path.exists(os.path.join(tmp, name)):
                _replace(os.path.join(tmp, name), os.path.join(out, name))
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()


def _replace(src, dst):
    import shutil

    if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)


def _write_model(model, weights, folder, acc):
    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
    else:
        ckpt.save_weights(weights, os.path.join(folder, "model.safetensors"))
