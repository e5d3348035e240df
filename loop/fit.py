"""`loop.train`: the whole training run, in five phases that each fit on a screen.

    check_inputs  -> build (seed, Accelerator, model, data, plan, optimizer/scheduler, EMA)
                  -> resume (state, weights, optimizer, RNG; when asked)
                  -> train_epochs: windows of W micro-batches;  grad_norm = run.step_fn(run, window)   (step.py)
                                   log / evaluate / save when due               (Trainer's DefaultFlowCallback order)
                  -> finish (final record, best model, save_model + EMA, on_train_end)

Host-device syncs happen only where a record is written (log boundaries, evaluation, checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from . import fast
from .callbacks import Callback, fire, fires_inside_the_step
from .config import TrainConfig
from .data import default_collator, eval_loader, given_loader, has_length, prepare_dataset, train_loader
from .errors import LoopError
from .evaluation import check_metrics_function, evaluate_metrics
from .model_changes import ModelChanges
from .optim import build_optimizer, build_scheduler, is_plateau, parameter_groups
from .preempt import Preempted, preemption
from .records import prints_above_the_bar
from .run import (
    Run,
    call_model_init,
    noisy_embeddings,
    overflow_debugging,
    place_model,
    plain,
    require_config,
    start,
    topology,
)
from .telemetry import Telemetry
from .trainer_callbacks import split as trainer_callbacks_split


@dataclass
class TrainResult:
    global_step: int
    training_loss: float
    metrics: dict
    log_history: list = field(default_factory=list)
    output_dir: str = ""
    fast: object = None  # the levers the run used and, for each one off, why (fast.Plan)


@dataclass
class Plan:
    """How long the run is, in Trainer's arithmetic."""

    steps_in_epoch: int  # micro-batches per epoch on this rank
    updates_per_epoch: int  # optimizer steps per epoch
    max_steps: int
    num_epochs: int
    log_every: int | None
    eval_every: int | None
    save_every: int | None


@dataclass
class Inputs:
    """What the caller hands train() besides the config: the task's objects and Trainer's hooks, None where not given
    (train()'s docstring says what each is). check_inputs judges them, build() uses them."""

    model: object = None
    train_dataset: object = None
    eval_dataset: object = None
    data_collator: object = None
    compute_metrics: object = None
    callbacks: object = None
    processing_class: object = None
    resume_from_checkpoint: object = None
    preprocess_logits_for_metrics: object = None
    compute_loss_func: object = None
    optimizers: object = (None, None)
    optimizer_cls_and_kwargs: object = None
    model_init: object = None
    optimizer_step: object = None
    compute_loss: object = None
    training_step: object = None
    create_scheduler: object = None
    log: object = None
    evaluate: object = None
    train_dataloader: object = None
    eval_dataloader: object = None

    # the hooks that must be functions when given
    FUNCTIONS = (
        "compute_loss_func",
        "optimizer_step",
        "compute_loss",
        "training_step",
        "create_scheduler",
        "log",
        "evaluate",
        "train_dataloader",
        "eval_dataloader",
    )


def train(
    config: TrainConfig,
    model=None,
    train_dataset=None,
    eval_dataset=None,
    data_collator=None,
    compute_metrics=None,
    callbacks=None,
    processing_class=None,
    resume_from_checkpoint=None,
    preprocess_logits_for_metrics=None,
    compute_loss_func=None,
    optimizers=(None, None),
    optimizer_cls_and_kwargs=None,
    model_init=None,
    optimizer_step=None,
    compute_loss=None,
    training_step=None,
    create_scheduler=None,
    log=None,
    evaluate=None,
    train_dataloader=None,
    eval_dataloader=None,
) -> TrainResult:
    """Train `model` on `train_dataset` as Trainer would with the same configuration and hooks (docs/api.md).

    Trainer's extension points carry Trainer's names: compute_loss_func(outputs, labels, num_items_in_batch),
    optimizers=(optimizer, lr_scheduler), optimizer_cls_and_kwargs=(cls, kwargs), model_init (a fresh model per
    run, instead of `model`); a Trainer subclass's compute_loss(model, inputs, return_outputs, num_items_in_batch)
    and training_step(model, inputs, num_items_in_batch) (once per micro-batch, its own backward: Trainer's contract;
    loop.Trainer hands them over), and its log(logs, start_time) and evaluate(), through which every record and every
    evaluation in training go (loop.Trainer's log() and evaluate() record and evaluate the running run).
    train_dataloader(build) and eval_dataloader(name, build) return the loader to use (a Trainer subclass's
    get_*_dataloader); build() makes a new one of the loop's own, as each of Trainer's get_*_dataloader calls does
    (an eval set's name: None, or its key in a dict of them).
    optimizer_step(run, window) -> grad_norm replaces the whole step (loop/step.py).
    """
    if config.auto_find_batch_size:
        return _find_batch_size(dict(locals()))
    given = Inputs(**{k: v for k, v in locals().items() if k != "config"})
    callbacks, resume_path = check_inputs(config, given)
    # everything the run changes on the model (fused head, attention implementation, hooks, wrappers, settings) is
    # put back when it returns or raises: the caller's model is theirs (model_changes.py)
    with ModelChanges() as changes, contextlib.ExitStack() as for_the_run:
        run = build(config, given, callbacks, changes, resuming=resume_path is not None)
        for_the_run.enter_context(run.fast.ddp_overlap())  # process-wide dynamo setting, put back after the run
        if run.sharded is not None:
            for_the_run.callback(run.sharded.remove)  # its hooks come off the caller's parameters
        for_the_run.enter_context(prints_above_the_bar(not config.disable_tqdm and run.accelerator.is_main_process))
        with preemption(run):  # through finish(): a SIGTERM after the last step lets the final model be written
            with noisy_embeddings(run), overflow_debugging(run):
                saved_rng = resume(run, resume_path)
                train_epochs(run, resumed=resume_path is not None, saved_rng=saved_rng)
            return finish(run, processing_class)


def _find_batch_size(arguments) -> TrainResult:
    """auto_find_batch_size (Trainer's): the run, started again with 0.9x the per-device batch each time it runs out
    of device memory (accelerate's find_executable_batch_size); a resume starts from the batch its checkpoint
    recorded (Trainer's rule). An attempt writes over what the one before it left in output_dir."""
    import dataclasses

    from accelerate.utils import find_executable_batch_size

    config = arguments.pop("config")
    start = config.per_device_train_batch_size
    path = ckpt.resolve_resume(arguments["resume_from_checkpoint"], config.output_dir)
    if path is not None:
        start = ckpt.read_state(path).geometry.get("per_device_train_batch_size") or start
    tried = []

    def attempt(batch_size):
        reuse = config.reuse_output_dir or bool(tried)
        tried.append(batch_size)
        run_config = dataclasses.replace(
            config, per_device_train_batch_size=batch_size, auto_find_batch_size=False, reuse_output_dir=reuse
        )
        return train(run_config, **arguments)

    return find_executable_batch_size(attempt, starting_batch_size=start)()


# ====================================================================================== 1. check inputs
def check_inputs(config, given: Inputs):
    """Refuse bad input with one line before anything is touched. Returns (callbacks, checkpoint to resume or None)."""
    model, model_init, optimizers = given.model, given.model_init, given.optimizers
    optimizer_cls_and_kwargs = given.optimizer_cls_and_kwargs
    train_dataset, eval_dataset = given.train_dataset, given.eval_dataset
    require_config(config)
    check_metrics_function(config, given.compute_metrics)
    if model is None and model_init is None:
        raise LoopError("train needs a model, or a model_init that returns one")
    if model is not None and model_init is not None:
        raise LoopError("pass either model or model_init, not both (model_init builds a fresh model for the run)")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise LoopError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
        raise LoopError("optimizers must be a pair (optimizer, lr_scheduler); either may be None")
    optimizer, scheduler = optimizers
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise LoopError(f"optimizers[0] must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scheduler is not None and optimizer is None:
        raise LoopError("optimizers=(None, scheduler): a scheduler needs its optimizer; pass (optimizer, scheduler)")
    if optimizer is not None and optimizer_cls_and_kwargs is not None:
        raise LoopError("pass either optimizers or optimizer_cls_and_kwargs, not both")
    if optimizer is not None and model_init is not None:
        raise LoopError(
            "model_init builds a new model, so an optimizer made beforehand cannot hold its parameters; "
            "pass optimizer_cls_and_kwargs instead of optimizers"
        )
    if optimizer is not None and config.param_groups:
        raise LoopError(
            "param_groups shapes the optimizer the loop builds; with optimizers=(...) build the groups "
            "into your optimizer, or drop param_groups"
        )
    if optimizer_cls_and_kwargs is not None and (
        not isinstance(optimizer_cls_and_kwargs, (tuple, list)) or len(optimizer_cls_and_kwargs) != 2
    ):
        raise LoopError("optimizer_cls_and_kwargs must be a pair (optimizer class, dict of its keyword arguments)")
    for name in Inputs.FUNCTIONS:
        fn = getattr(given, name)
        if fn is not None and not callable(fn):
            raise LoopError(f"{name} must be a function, got {type(fn).__name__}")
    if train_dataset is None:
        raise LoopError("train_dataset is required")
    if not has_length(train_dataset) and config.max_steps <= 0:
        raise LoopError("the train dataset has no length; set max_steps > 0")
    if config.eval_strategy != "no" and eval_dataset is None:
        raise LoopError(
            f"eval_strategy={config.eval_strategy!r} needs an eval_dataset; pass one or set eval_strategy=no"
        )
    if config.eval_on_start and eval_dataset is None:
        raise LoopError("eval_on_start needs an eval_dataset")
    # transformers' TrainerCallbacks (instances or classes) behind one adapter, served by the same dispatch
    callbacks, trainer_callbacks = trainer_callbacks_split(list(given.callbacks or []))
    if trainer_callbacks is not None:
        callbacks.append(trainer_callbacks)
    if config.early_stopping_patience is not None:
        from .callbacks import EarlyStopping

        callbacks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_threshold))
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise LoopError(
                f"callback {cb!r} is neither a loop.Callback nor a transformers TrainerCallback; subclass either"
            )
        if getattr(cb, "needs_metric", False) and config.metric_for_best_model is None:
            raise LoopError(
                f"{type(cb).__name__} judges metric_for_best_model, which is unset; set it (e.g. "
                "--metric_for_best_model loss) or drop the callback"
            )
    resume = given.resume_from_checkpoint
    resume = resume if resume is not None else config.resume_from_checkpoint
    return callbacks, ckpt.precheck_resume(resume, config.output_dir, config.save_on_each_node)


# ====================================================================================== 2. build
def build(config, given: Inputs, callbacks, changes=None, resuming=False) -> Run:
    """Seed, Accelerator, model, data, the plan, optimizer and scheduler, EMA: a Run ready for its first step.
    `callbacks` are check_inputs' (the caller's, with Trainer's callbacks behind one adapter)."""
    model, optimizers = given.model, given.optimizers
    train_dataset, eval_dataset = given.train_dataset, given.eval_dataset
    acc = start(config)  # seeds first, exactly where Trainer seeds
    ckpt.check_output_dir(config, acc, resuming)
    if config.report_to:
        acc.init_trackers(config.run_name or config.project, config=_flat(config.to_dict()))
    if given.model_init is not None:
        model = call_model_init(given.model_init)  # after the seed, as Trainer.train() does
    if changes is not None:  # train()'s record of the model as handed over, put back when the run ends
        changes.track(model)
    model = place_model(config, model, acc)
    run = Run(
        config,
        model,
        acc,
        callbacks,
        given.compute_metrics,
        given.preprocess_logits_for_metrics,
        given.compute_loss_func,
        given.optimizer_step,
    )
    run.compute_loss, run.training_step = given.compute_loss, given.training_step  # a Trainer subclass's overrides
    run.log_hook = given.log  # a Trainer subclass's log(logs, start_time): every record goes through it
    run.evaluate_hook = given.evaluate  # a Trainer subclass's evaluate(): every evaluation in training goes through it
    collator = default_collator(given.data_collator, given.processing_class)
    train_ds, train_collate = prepare_dataset(train_dataset, collator, model, config, run.label_names, "train")
    # a dict of named eval sets is evaluated set by set, each under eval_<name>_ (Trainer's rule)
    named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
    evals = {name: prepare_dataset(ds, collator, model, config, run.label_names, "eval") for name, ds in named.items()}
    main_input = getattr(model, "main_input_name", "input_ids")
    if acc.distributed_type.name == "DEEPSPEED":
        deepspeed_follows(config, acc)
    optimizer, scheduler = optimizers
    if optimizer is None:
        optimizer = build_optimizer(config, model, given.optimizer_cls_and_kwargs)
        run.group_names = parameter_groups(config, model)[1] if config.param_groups else []
    run.optimizer = optimizer
    # what `fast` and the levers' own fields turn on, decided once (fast.py), then applied before prepare()
    run.fast, table = fast.resolve(
        config,
        acc,
        model,
        train_ds,
        train_collate,
        optimizer,
        own_loss=run.owns_loss,
        custom_step=given.optimizer_step is not None or given.training_step is not None,
        main_input=main_input,
        step_events=fires_inside_the_step(run.callbacks),
    )
    # the loop's own loaders, or what a Trainer subclass's get_*_dataloader returns (its super() builds the loop's)
    build = functools.partial(train_loader, config, train_ds, train_collate, acc, table)
    run.loader = build() if given.train_dataloader is None else given_loader(acc, given.train_dataloader(build))
    run.evaluators = {}
    for name, (ds, c) in evals.items():
        if ds is not None:
            build = functools.partial(eval_loader, config, ds, c, acc)
            run.evaluators[name] = (
                build() if given.eval_dataloader is None else given_loader(acc, given.eval_dataloader(name, build))
            )
    run.evaluator = run.evaluators.get(None)  # the one eval set, when there is no dict of them
    run.plan = plan = make_plan(config, run.loader)
    fast.apply(run.fast, run)
    run.model, run.optimizer = acc.prepare(model, optimizer)
    run.unwrapped = acc.unwrap_model(run.model, keep_torch_compile=False)  # the module itself, not its compiled wrapper
    gradient_exchange(
        config, run, optimizer, given_optimizer=optimizers[0] is not None, custom_step=given.optimizer_step
    )
    # a scheduler given with its optimizer is used as it is; otherwise a Trainer subclass's create_scheduler(number of
    # steps, optimizer), or Trainer's own
    if scheduler is None and given.create_scheduler is not None:
        scheduler = given.create_scheduler(plan.max_steps, run.optimizer)
    run.scheduler = scheduler if scheduler is not None else build_scheduler(config, run.optimizer, plan.max_steps)
    if config.ema_decay > 0:
        if topology(acc) == "DEEPSPEED_ZERO3":
            raise LoopError(
                "ema_decay under DeepSpeed ZeRO-3 is not supported: its parameters are empty placeholders "
                "outside DeepSpeed's own gathers, so there is nothing to average; use FSDP2 (the EMA is "
                "kept per shard), ZeRO-2 or DDP, or set ema_decay 0"
            )
        if acc.distributed_type.name == "FSDP" and config.ema_on_cpu:
            raise LoopError(
                "ema_on_cpu under FSDP is not supported: the EMA is kept per shard next to the weights "
                "(1/N of the model per GPU); set ema_on_cpu false"
            )
        from .ema import EMA

        run.ema = EMA(
            run.unwrapped,
            config.ema_decay,
            config.ema_warmup,
            config.ema_start_step,
            device="cpu" if config.ema_on_cpu else None,
        )
    run.state.max_steps = plan.max_steps
    run.state.geometry = {
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "world_size": acc.num_processes,
        "train_examples": len(train_ds) if has_length(train_ds) else None,
    }
    run.telemetry = Telemetry(run, main_input)
    return run


def gradient_exchange(config, run, optimizer, given_optimizer: bool, custom_step) -> None:
    """How gradients cross processes under DDP, after prepare() and before the scheduler exists: DDP's all-reduce
    (fp32, or bf16 through a comm hook, zero.bf16_allreduce_hook), or the sharded optimizer (zero.py), whose optimizer
    over the rank's shards takes the place of `optimizer` inside accelerate's wrapper. prepare() wraps the model in
    DDP exactly when there is something to exchange (several processes, no FSDP or DeepSpeed)."""
    acc = run.accelerator
    ddp = getattr(run.model, "_orig_mod", run.model)  # under the compiled wrapper, if any
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        if (config.sharded_optimizer or config.grad_reduce_dtype) and acc.num_processes > 1:
            raise LoopError(
                f"sharded_optimizer and grad_reduce_dtype are for DDP; under {acc.distributed_type.name} the "
                "framework shards and reduces itself: set them off"
            )
        return
    if not config.sharded_optimizer:
        if config.grad_reduce_dtype:
            from .zero import bf16_allreduce_hook

            ddp.register_comm_hook(None, bf16_allreduce_hook)
        return
    if given_optimizer or custom_step is not None or acc.gradient_state.plugin_kwargs.get("sync_each_batch", False):
        raise LoopError(
            "sharded_optimizer builds the run's optimizer over each rank's shard and reduces the gradients in its own "
            "step: it cannot take a given optimizer, a custom optimizer_step or sync_each_batch; drop those or set "
            "sharded_optimizer false"
        )
    from .zero import ShardedOptimizer

    run.sharded = ShardedOptimizer(run.unwrapped, optimizer, config.grad_reduce_dtype, config.ddp_bucket_cap_mb or 25)
    run.optimizer.optimizer = run.sharded.optimizer  # accelerate's wrapper steps the shards (then they are gathered)
    if ddp_wrapper_unneeded(run, ddp):
        run.model = module_without_ddp(acc, run.model, ddp)
    else:
        run.sharded.kept_ddp = ddp


def ddp_wrapper_unneeded(run, ddp) -> bool:
    """Whether the sharded optimizer's run can drop DDP's wrapper: it sends the gradients itself, so the wrapper only
    holds a second gradient-sized copy in its reducer's buckets. It is kept where it still does something: a model
    with buffers (DDP broadcasts them from rank 0 before forwards), or a compiled model whose graph dynamo splits at
    DDP's buckets (ddp_compile_overlap, torch's default outside `fast`), the split that lets buckets go out during a
    compiled backward."""
    from torch._dynamo import config as dynamo_config

    if any(True for _ in ddp.module.buffers()) and ddp.broadcast_buffers:
        return False
    compiled = run.model is not ddp
    overlap = run.fast.ddp_compile_overlap
    return not (compiled and (dynamo_config.optimize_ddp if overlap is None else overlap))


def module_without_ddp(acc, prepared, ddp):
    """The module in place of DDP's wrapper, compiled as prepare() compiled the wrapper, in accelerate's list of models
    too; the wrapper and its reducer (buckets and autograd hooks) are then freed. DDP's constructor has already
    broadcast rank 0's parameters and buffers, so every rank starts from the same weights."""
    from accelerate.utils import compile_regions

    module = ddp.module
    if prepared is not ddp:
        plugin = acc.state.dynamo_plugin
        compile_fn = compile_regions if plugin.use_regional_compilation else torch.compile
        module = compile_fn(module, **plugin.to_kwargs())
    acc._models = [module if m is prepared else m for m in acc._models]
    return module


def deepspeed_follows(config, acc):
    """DeepSpeed's config takes the loop's settings, so that nothing is accumulated, scaled or clipped twice: the loop
    accumulates whole windows itself (DeepSpeed's gradient_accumulation_steps 1, its boundary set from the loop's
    sync flag by accelerate), and DeepSpeed clips at max_grad_norm (0: not at all) when it steps at the boundary.
    Precision comes from --bf16/--fp16 through the Accelerator. ZeRO-3 gathers the 16-bit weights for the final model."""
    plugin = acc.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["train_batch_size"] = config.per_device_train_batch_size * acc.num_processes
    ds["gradient_accumulation_steps"] = plugin.gradient_accumulation_steps = 1
    ds["gradient_clipping"] = plugin.gradient_clipping = config.max_grad_norm
    if plugin.zero_stage == 3:
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def make_plan(config, loader) -> Plan:
    GA = config.gradient_accumulation_steps
    if has_length(loader):
        steps_in_epoch = len(loader)
        if steps_in_epoch == 0:
            raise LoopError(
                "the train dataset gives no batch (fewer examples than one batch with "
                "dataloader_drop_last); lower the batch size or add data"
            )
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
    every = (config.steps_for(k, max_steps) for k in ("logging", "eval", "save"))
    return Plan(steps_in_epoch, updates_per_epoch, max_steps, num_epochs, *every)


# ====================================================================================== 3. resume
def resume(run, resume_path):
    """The geometry check, then every stateful part loaded from the checkpoint (checkpoint.PARTS, the table save
    writes). Returns the saved RNG (or None): the loop sets it at the data position."""
    acc, config = run.accelerator, run.config
    run.saved_rng = None
    if resume_path is not None:
        # checksums read once per filesystem, one verdict for all ranks
        resume_path = ckpt.verify_resume(acc, resume_path, config.output_dir, config.save_on_each_node)
        saved = ckpt.read_state(resume_path).geometry
        geometry = run.state.geometry
        # a key the checkpoint does not record (a Trainer checkpoint's dataset length) is taken on trust
        changed = {k: (saved[k], v) for k, v in geometry.items() if k in saved and saved[k] != v}
        if changed and not config.allow_inexact_resume:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise LoopError(
                f"cannot resume {resume_path} exactly: {what}; restore those settings, or pass "
                "--allow_inexact_resume true to accept an approximate data position"
            )
        ckpt.load(run, resume_path)
        if changed:  # inexact: keep the epoch, restart its data
            run.state.batches_in_epoch = 0
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            warnings.warn(f"resuming {resume_path} inexactly ({what}): the current epoch's data starts again")
    run.resumed_from = resume_path
    run.start_step = run.state.global_step
    run.records = _Records(run, run.plan.max_steps, run.start_step)
    if ckpt.writes(acc, config):
        ckpt.clean_stale(config.output_dir)
    if resume_path is not None:
        run.records.out.note({"event": "resumed", "from": resume_path, "step": run.state.global_step})
    return run.saved_rng


# ====================================================================================== 4. the epochs
def train_epochs(run, resumed: bool, saved_rng):
    """Epochs of accumulation windows; after each optimizer step, log / evaluate / save when due."""
    config, state, plan, GA = run.config, run.state, run.plan, run.config.gradient_accumulation_steps
    run.start_time = time.time()
    run.telemetry.last_time, run.telemetry.last_step = time.perf_counter(), state.global_step
    run.stop = fire(run.callbacks, "on_train_begin", run)
    if config.eval_on_start and not resumed:
        run_eval(run, on_start=True)
    for epoch in range(state.epoch_index, plan.num_epochs):
        if run.stop or run.control.should_training_stop or state.global_step >= plan.max_steps:
            break
        state.epoch_index = epoch
        fire(run.callbacks, "on_epoch_begin", run)
        batches, skip = _epoch_batches(run, epoch, resumed, saved_rng)
        resumed, step = False, skip - 1
        remainder = plan.steps_in_epoch % GA or GA
        for update in range(skip // GA, plan.updates_per_epoch):
            window = list(itertools.islice(batches, GA if update != plan.updates_per_epoch - 1 else remainder))
            if not window:
                break
            fire(run.callbacks, "on_step_begin", run)
            run.grad_norm = run.step_fn(run, window)
            step += len(window)
            state.batches_in_epoch = step + 1
            state.global_step += 1
            state.epoch = epoch + (step + 1) / plan.steps_in_epoch
            run.records.out.advance()
            run.stop = fire(run.callbacks, "on_step_end", run) or run.stop
            if config.torch_empty_cache_steps and state.global_step % config.torch_empty_cache_steps == 0:
                from accelerate.utils.memory import clear_device_cache

                clear_device_cache()
            log_eval_save(run, *_due(run))
            if run.stop or run.control.should_training_stop or run.control.should_epoch_stop:
                break
            if run.preemption is not None and run.preemption.voted():  # a host-side vote of the ranks, every step
                stop_preempted(run)
        if step < 0:
            warnings.warn(f"epoch {epoch} gave no batch; stopping at step {state.global_step}")
            run.stop = True
        # epoch end: the position moves to the next epoch before anything is saved
        state.epoch_index, state.batches_in_epoch = epoch + 1, 0
        fire(run.callbacks, "on_epoch_end", run)
        control = run.control  # a TrainerCallback may ask for a log, an evaluation or a save here (Trainer's control)
        log_eval_save(
            run,
            config.logging_strategy == "epoch" or control.should_log,
            (config.eval_strategy == "epoch" and config.eval_delay <= state.epoch) or control.should_evaluate,
            config.save_strategy == "epoch" or control.should_save,
        )
        run.stop = run.stop or control.should_training_stop


def _epoch_batches(run, epoch, resumed, saved_rng):
    """The epoch's batch iterator, started, and how many micro-batches a resume skips. On resume the RNG is set to the
    epoch's start before the iterator draws (so it draws what it drew the first time), then to the saved state."""
    config, acc = run.config, run.accelerator
    skip = run.state.batches_in_epoch if resumed and not config.ignore_data_skip else 0
    epoch_loader = run.loader
    if skip:  # a DataLoader skips by index, loading nothing; another iterable (a custom loader) reads and drops
        is_loader = isinstance(run.loader, torch.utils.data.DataLoader)
        epoch_loader = acc.skip_first_batches(run.loader, skip) if is_loader else _dropping(run.loader, skip)
    _set_epoch(epoch_loader, epoch)
    restore = saved_rng if resumed else None
    # a Trainer checkpoint has no epoch-start streams: its loader starts under the current ones, as Trainer's does
    epoch_start = restore.get("epoch_start") if (restore is not None and skip) else None
    if restore is not None and (epoch_start is not None or not skip):
        ckpt.set_rng_state(epoch_start if skip else restore)  # at an epoch boundary: the state at save
    run.epoch_start_rng = epoch_start if epoch_start is not None else ckpt.rng_state()
    batches = _started(epoch_loader)  # the loader's random draws happen here, under the epoch-start state
    if restore is not None and skip:
        ckpt.set_rng_state(restore)  # now continue from the saved random streams
    return batches, skip


def _due(run):
    """(should_log, should_eval, should_save) after this step; the last step stops the run and forces eval/save."""
    config, plan, gs = run.config, run.plan, run.state.global_step
    should_log = (gs == 1 and config.logging_first_step) or (
        config.logging_strategy == "steps" and gs % plan.log_every == 0
    )
    eval_due = config.eval_strategy == "steps" and config.eval_delay <= gs
    should_eval = eval_due and gs % plan.eval_every == 0
    should_save = config.save_strategy == "steps" and plan.save_every > 0 and gs % plan.save_every == 0
    if gs >= plan.max_steps:
        run.stop = True
        should_eval = should_eval or eval_due
        should_save = should_save or config.save_strategy == "steps"
    control = run.control  # what a TrainerCallback asked for in on_step_end (Trainer's DefaultFlowCallback agrees)
    return should_log or control.should_log, should_eval or control.should_evaluate, should_save or control.should_save


def log_loss(run):
    """A loss record: the one sync point of the training loop (log boundary)."""
    acc, state = run.accelerator, run.state
    loss_sum = acc.gather(run.tr_loss).mean().item()
    run.tr_loss -= run.tr_loss  # Trainer resets this way (keeps nan visible)
    record = {"loss": loss_sum / (state.global_step - state.last_logged_step)}
    if run.grad_norm is not None:
        record["grad_norm"] = plain(run.grad_norm).item() if torch.is_tensor(run.grad_norm) else run.grad_norm
    record["learning_rate"] = run.last_lr
    for name, lr in zip(run.group_names, run.last_group_lrs):
        record[f"learning_rate/{name}"] = lr
    state.total_loss += loss_sum
    state.last_logged_step = state.global_step
    run.records.log(record, run.start_time, telemetry=True)


def evaluate_sets(run) -> dict:
    """Each eval set evaluated, recorded and handed to on_evaluate; a dict's sets each under eval_<name>_, as
    Trainer's evaluate() does. A callback's request to stop is kept in run.eval_stop."""
    metrics = {}
    for name, loader in run.evaluators.items():
        prefix = "eval" if name is None else f"eval_{name}"
        run.evaluating = loader  # what TrainerCallbacks hand over as eval_dataloader
        got = evaluate_metrics(run, loader, prefix)
        run.records.log(got)
        got["epoch"] = run.state.epoch  # Trainer's log() adds it to the metrics that on_evaluate then receives
        run.eval_stop = fire(run.callbacks, "on_evaluate", run, got) or run.eval_stop
        metrics.update(got)
    return metrics


def run_eval(run, on_start=False):
    """Evaluate each eval set (and the EMA weights, swapped in place); returns (metrics, a callback asked to stop).
    A Trainer subclass's evaluate() is called in its place; its super().evaluate() comes back to evaluate_sets."""
    run.eval_stop = False
    metrics = dict(run.evaluate_hook()) if run.evaluate_hook is not None else evaluate_sets(run)
    stop_now = run.eval_stop
    if run.ema is not None:
        for name, loader in run.evaluators.items():
            with run.ema.swapped(run.unwrapped):  # EMA weights in, the trained ones back after (also on failure)
                ema_metrics = evaluate_metrics(run, loader, prefix="eval_ema" if name is None else f"eval_ema_{name}")
            run.records.log(ema_metrics)
            metrics.update(ema_metrics)
    if is_plateau(run.scheduler) and not on_start:
        run.scheduler.step(_metric(run.config, metrics))
    return metrics, stop_now


def log_eval_save(run, should_log, should_eval, should_save):
    """Trainer's _maybe_log_save_evaluate, in the same order."""
    config, state = run.config, run.state
    if should_log or should_eval or should_save:
        check_finite(run)  # a boundary: nothing is logged as normal, evaluated or saved after a divergence
    if should_log and state.global_step > state.last_logged_step:
        log_loss(run)
    if should_eval:
        metrics, stop_now = run_eval(run)
        run.stop = run.stop or stop_now
        value = _metric(config, metrics) if config.metric_for_best_model else None
        better = value is not None and (
            state.best_metric is None
            or (value > state.best_metric if config.greater_is_better else value < state.best_metric)
        )
        if better:
            state.best_metric = value
            if config.save_strategy != "no":
                state.best_global_step = state.global_step
        if config.save_strategy == "best":
            should_save = better
    if should_save:
        if config.metric_for_best_model is not None and state.best_global_step:
            # Trainer's rule: the best step's checkpoint, this one or one saved before the evaluation that found it
            # (eval and save at different points); recorded before saving so the saved state knows
            best = os.path.join(config.output_dir, f"{ckpt.PREFIX}{state.best_global_step}")
            if state.best_global_step == state.global_step or os.path.isdir(best):
                state.best_checkpoint = best
        path = ckpt.save(run)
        run.saved_step = state.global_step
        if ckpt.writes(run.accelerator, config):
            ckpt.rotate(config.output_dir, config.save_total_limit, keep=(state.best_checkpoint,))
        run.stop = fire(run.callbacks, "on_save", run, path) or run.stop


def stop_preempted(run):
    """SIGTERM under enable_jit_checkpoint: a complete checkpoint of this step (unless this step just wrote one), then
    Preempted. No final model: the run is not finished."""
    state = run.state
    if run.saved_step != state.global_step:
        log_eval_save(run, should_log=False, should_eval=False, should_save=True)  # the log resumes where it stopped
    path = os.path.join(run.config.output_dir, f"{ckpt.PREFIX}{state.global_step}")
    run.records.out.note({"event": "preempted", "step": state.global_step, "checkpoint": path})
    run.records.out.close()
    raise Preempted(
        f"SIGTERM: stopped at step {state.global_step} of {run.plan.max_steps} and saved {path}; continue "
        "with --resume_from_checkpoint latest"
    )


def _dropping(loader, n):
    yield from itertools.islice(loader, n, None)


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
        raise LoopError(
            f"metric_for_best_model={name!r}: evaluation gave no {key!r} (it gave "
            f"{', '.join(sorted(k for k in metrics if not k.endswith(('_runtime', '_per_second'))))}); "
            "pick one of those"
        )
    return metrics[key]


def _flat(d):
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


class _Records:
    """Appends records to log_history and sends them out (file, bar, trackers, callbacks)."""

    def __init__(self, run, max_steps, start_step):
        from .records import Records

        self.run, self.telemetry = run, False
        self.out = Records(run.config, run.accelerator, max_steps, start_step)

    def log(self, logs: dict, start_time=None, telemetry=False):
        """A record; through a Trainer subclass's log(logs, start_time) when it has one (its super().log() comes
        back to emit(), as Trainer's log does the recording)."""
        if self.run.log_hook is None:
            return self.emit(logs, start_time, telemetry)
        self.telemetry = telemetry
        if start_time is None:  # Trainer calls log(logs) for every record but the loss one
            self.run.log_hook(dict(logs))
        else:
            self.run.log_hook(dict(logs), start_time)

    def emit(self, logs: dict, start_time=None, telemetry=None):
        run, state = self.run, self.run.state
        telemetry = self.telemetry if telemetry is None else telemetry
        logs = dict(logs)
        logs["epoch"] = state.epoch
        # reduces the step counters across ranks: a log-boundary sync
        logs.update(run.telemetry.record(start_time, loss_record=telemetry))
        record = {**logs, "step": state.global_step}
        state.log_history.append(record)
        self.out.write(record, state.global_step)
        fire(run.callbacks, "on_log", run, record)


def check_finite(run):
    """Stop the run if a step's loss or grad norm was non-finite (a sync: called at boundaries only)."""
    if not run.watch_nonfinite:
        return
    acc, flags = run.accelerator, run.finite_flags
    first = 0  # this rank's first step with a non-finite loss or grad norm since the last boundary, 0 for none
    if flags:
        bad = torch.logical_not(torch.stack([f for _, f in flags])).nonzero()  # the sync (a boundary)
        first = flags[int(bad[0])][0] if len(bad) else 0
        run.finite_flags = []
    if acc.num_processes > 1:  # every rank stops, at the earliest step any of them saw
        steps = [s for s in acc.gather(torch.tensor([first], device=acc.device)).tolist() if s > 0]
    else:
        steps = [first] if first else []
    if not steps:
        return
    found = ckpt.list_checkpoints(run.config.output_dir)
    last = found[-1][1] if found else None
    run.records.out.note({"event": "diverged", "step": min(steps), "last_good_checkpoint": last})
    run.records.out.close()
    resume = f"resume from {last} (--resume_from_checkpoint {last}) with" if last else "restart with"
    raise LoopError(
        f"training diverged: the loss or grad norm turned non-finite at step {min(steps)} (noticed at step "
        f"{run.state.global_step}); no checkpoint or model was written from it; the last good checkpoint "
        f"is {last or 'none'}: {resume} a lower learning_rate, more warmup or max_grad_norm "
        "(stop_on_nonfinite false carries on as Trainer does)"
    )


# ====================================================================================== 5. finish
def finish(run, processing_class=None) -> TrainResult:
    """The final record, the best model, the saved model (and EMA), on_train_end."""
    from transformers.trainer_utils import speed_metrics

    acc, cfg, state, records, start_step = run.accelerator, run.config, run.state, run.records, run.start_step
    check_finite(run)  # never a final model from non-finite weights
    loss_sum = acc.gather(run.tr_loss).mean().item()
    state.total_loss += loss_sum
    steps_here = state.global_step - start_step
    # train_loss averages every step of the run, including those before a resume (the uninterrupted value); from a
    # Trainer checkpoint, which saves no running loss, the steps since the resume (what Trainer reports then)
    train_loss = state.total_loss / max(state.global_step - state.loss_counted_from, 0.001)
    total_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    metrics = speed_metrics("train", run.start_time, num_samples=total_batch * steps_here, num_steps=steps_here)
    run.telemetry.flush()
    metrics["total_flos"] = state.total_flos
    metrics["train_loss"] = train_loss
    records.log(metrics)
    if cfg.load_best_model_at_end and state.best_checkpoint and os.path.isdir(state.best_checkpoint):
        ckpt.load_weights(run.unwrapped, state.best_checkpoint)
    if cfg.save_total_limit == 1 and state.best_checkpoint and ckpt.writes(acc, cfg):
        # Trainer's rule: with a limit of 1 the newest was kept only while training could go on; keep the best
        for _, path in ckpt.list_checkpoints(cfg.output_dir):
            if os.path.abspath(path) != os.path.abspath(state.best_checkpoint):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
    if cfg.save_final_model:
        save_model(run, processing_class)
    fire(run.callbacks, "on_train_end", run)
    records.out.close()
    if cfg.report_to:
        acc.end_training()
    acc.wait_for_everyone()
    return TrainResult(state.global_step, train_loss, metrics, state.log_history, cfg.output_dir, run.fast)


def save_model(run, processing_class=None):
    """Save the final weights the way trainer.save_model() does, atomically; the EMA under ema/."""
    acc, cfg = run.accelerator, run.config
    out = cfg.output_dir
    tmp = os.path.join(out, ".tmp-final")
    # get_state_dict gathers collectively; under ZeRO-3 only the main process receives the weights (None elsewhere)
    weights = _stripped(acc.get_state_dict(run.model))
    ema_weights = None
    if run.ema is not None:
        with run.ema.swapped(run.unwrapped):
            ema_weights = _stripped(acc.get_state_dict(run.model), clone=True)  # the swap back reuses the storage
    if ckpt.writes(acc, cfg):
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


def _stripped(state_dict, clone=False):
    if state_dict is None:  # a ZeRO-3 rank other than the main one
        return None
    return {k: v.clone() if clone else v for k, v in ckpt.strip_prefixes(state_dict).items()}


def _replace(src, dst):
    import shutil

    if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)


def _write_model(model, weights, folder, acc):
    """Called by the process that writes (ckpt.writes): with save_on_each_node, each node's first process."""
    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        # newer transformers' save_pretrained writes only on global rank 0 once torch.distributed is up (so Trainer's
        # save_on_each_node leaves the other nodes without a final model); here the loop has chosen this process
        patch = hasattr(model, "should_save_on_this_rank") and "should_save_on_this_rank" not in vars(model)
        if patch:
            model.should_save_on_this_rank = lambda is_main_process: True
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would cut into the training bar's line
        try:
            model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
            if patch:
                del model.should_save_on_this_rank
    else:
        ckpt.save_weights(weights, os.path.join(folder, "model.safetensors"))
