"""`loop.Trainer`: transformers.Trainer's interface on the loop's own parts, so that Trainer code runs with one import
changed. A thin face, not a second loop: `train()` is `loop.train`, `evaluate()`/`predict()` are `loop.evaluate` and
`loop.predict`, callbacks go through the loop's one dispatch (trainer_callbacks.py). Neither a subclass of
transformers.Trainer nor a caller of it.

A subclass's overrides plug into the loop's hooks at Trainer's points:
  * compute_loss(model, inputs, return_outputs, num_items_in_batch): the loss of every micro-batch, in training and
    evaluation, normalised by Trainer's rule for it;
  * training_step(model, inputs, num_items_in_batch): once per micro-batch, doing its own backward (Trainer's
    contract); super().training_step() is the loop's own micro-batch;
  * create_optimizer(): called before training, its optimizer handed to the loop;
  * create_scheduler(num_training_steps, optimizer): called once the run's length is known;
  * log(logs, start_time): every record of the run goes through it; super().log() records it;
  * evaluate(): every evaluation in training goes through it (by way of _evaluate(), as in Trainer: code that patches
    _evaluate decides the metrics); super().evaluate() evaluates the run's eval sets;
  * get_train_dataloader(), get_eval_dataloader(eval_dataset), get_test_dataloader(test_dataset): what they return
    is trained, evaluated or predicted on; each super() call returns a new loader of the loop's own (Trainer's
    sampler, collator, workers), and a torch DataLoader not yet prepared is prepared by the run's Accelerator.
A subclass that overrides none of them runs the loop's own step, with the loop's numbers and speed. Overrides of
Trainer's internals that the loop does not call (NOT_HONOURED: prediction_step, the inner loop, its checkpoint writer)
are refused when the Trainer is made, in one line naming them.
"""

from __future__ import annotations

import copy
import os

from .callbacks import Callback
from .errors import LoopError

# Trainer methods a subclass may override that the loop does not call: refused by name rather than silently ignored
NOT_HONOURED = (
    "prediction_step",
    "create_optimizer_and_scheduler",
    "evaluation_loop",
    "_inner_training_loop",
    "_maybe_log_save_evaluate",
    "_save_checkpoint",
    "get_batch_samples",
)


# a subclass's overrides of these are handed to loop.train's hooks of the same names
HOOKED = ("compute_loss", "training_step", "log", "create_scheduler")


class Trainer:
    """transformers.Trainer's constructor, attributes and public methods, running the loop (see the module docstring)."""

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
    ):
        from transformers.trainer_callback import TrainerControl, TrainerState

        from .config import TrainConfig
        from .run import make_accelerator
        from .trainer_callbacks import TrainerCallbacks

        overridden = [name for name in NOT_HONOURED if _overrides(self, name)]
        if overridden:
            raise LoopError(
                f"{type(self).__name__} overrides {', '.join(overridden)}, which loop.Trainer does not call (the loop "
                "owns its data loading, evaluation and logging); move the logic into a callback, compute_loss or "
                "training_step, or use transformers.Trainer for this subclass"
            )
        if args is None:
            self.config = TrainConfig(output_dir="trainer_output")
        elif isinstance(args, TrainConfig):
            self.config = args
        else:  # TrainingArguments: mirrored, or refused by name (TrainConfig.from_training_arguments)
            self.config = TrainConfig.from_training_arguments(args)
            # Trainer's rule: accelerator_config's num_steps becomes the arguments' gradient_accumulation_steps
            args.gradient_accumulation_steps = self.config.gradient_accumulation_steps
        if model is None and model_init is None:
            raise LoopError("Trainer needs a model, or a model_init that returns one")
        from transformers import set_seed

        from .run import call_model_init

        set_seed(self.config.seed)  # as Trainer.__init__ does, before its model_init
        if model_init is not None:
            model = call_model_init(model_init)  # Trainer's: the model exists from construction (train() makes anew)
        self.args = args if args is not None else self.config
        self.model = self.model_wrapped = model
        self.model_init = model_init
        self.data_collator, self.processing_class = data_collator, processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_loss_func, self.compute_metrics = compute_loss_func, compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        # Trainer's attribute (a TrainConfig has no train_batch_size: its per-device batch); after train(), the
        # batch auto_find_batch_size found
        self._train_batch_size = getattr(self.args, "train_batch_size", self.config.per_device_train_batch_size)
        self.state, self.control = TrainerState(), TrainerControl()
        # Trainer's callbacks, in Trainer's order: DefaultFlowCallback, the trackers report_to names (transformers'
        # integrations, in place of the loop's own trackers), the caller's, then the progress bar or the printer
        # (in place of the loop's own bar)
        self._trainer_output = not isinstance(self.args, TrainConfig)
        # as Trainer: an Accelerator from construction (helpers such as get_train_dataloader and callbacks use it);
        # each train() makes the run's own, which takes its place
        self.accelerator = make_accelerator(self._run_config())
        if self._trainer_output and self.args.should_save:  # Trainer makes its output_dir when it is made
            os.makedirs(self.args.output_dir, exist_ok=True)
        integrations = []
        if self._trainer_output:
            from transformers.integrations import get_reporting_integration_callbacks

            integrations = get_reporting_integration_callbacks(self.args.report_to)
        self._callbacks = TrainerCallbacks(integrations, self.args, self.state, self.control)
        self.callback_handler = self._callbacks.handler
        self._loop_callbacks = []
        for cb in callbacks or []:
            self.add_callback(cb)
        if self._trainer_output:
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            self.add_callback(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        self._run, self._trial, self._trial_model, self.hp_name = None, None, None, None
        self._default_loader = None  # while a subclass's get_*_dataloader runs: what makes its super()'s loader
        self._eval_dataloaders = {}
        from .run import make_label_smoother

        self.label_smoother = make_label_smoother(self.config, model)  # Trainer's attribute (the run makes its own)
        self.callback_handler.model, self.callback_handler.processing_class = model, processing_class
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, callback):
        from .trainer_callbacks import is_trainer_callback

        if is_trainer_callback(callback):
            self.callback_handler.add_callback(callback)
        else:  # a loop.Callback: the same run, the loop's own interface
            self._loop_callbacks.append(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    # ------------------------------------------------------------------ training
    def create_optimizer(self):
        """Trainer's create_optimizer: `optim` by name over Trainer's parameter groups (loop.optim)."""
        from .optim import build_optimizer

        if self.optimizer is None:
            self.optimizer = build_optimizer(self.config, self.model, self.optimizer_cls_and_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        """Trainer's create_scheduler: `lr_scheduler_type` with its warmup, over `num_training_steps` (loop.optim)."""
        from .optim import build_scheduler

        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(self.config, optimizer or self.optimizer, num_training_steps)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's compute_loss: the model's own loss (or compute_loss_func's, the label smoother's), as the loop
        computes it. Callable from a subclass's override during training."""
        from .step import forward_loss

        run = self._active_run("compute_loss")
        saved, run.compute_loss = run.compute_loss, None  # the loop's own loss, not the override again
        try:
            loss, outputs = forward_loss(run, model, inputs, num_items_in_batch)
        finally:
            run.compute_loss = saved
        if (
            self.config.average_tokens_across_devices
            and (run.accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
            and model.training
        ):
            loss = loss * run.accelerator.num_processes  # Trainer's compute_loss undoes DDP's average here
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's training_step: forward, the loss scaled for the window, backward; returns the detached loss."""
        from .step import micro_batch_loss

        run = self._active_run("training_step")
        saved, run.training_step = run.training_step, None
        try:
            loss = micro_batch_loss(run, inputs, num_items_in_batch, run.window_size)
            run.accelerator.backward(loss)
        finally:
            run.training_step = saved
        return loss.detach()

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        from transformers.trainer_utils import TrainOutput

        if kwargs:
            raise LoopError(f"train() got unexpected arguments {', '.join(kwargs)}")
        if self.model_init is not None:  # a fresh model: the previous run's optimizer and scheduler go (Trainer's rule)
            self.optimizer, self.lr_scheduler = None, None
        if _overrides(self, "create_optimizer"):
            if self.model is None:
                raise LoopError("a create_optimizer override needs the model: pass model=, not model_init")
            self.create_optimizer()
        # a subclass's overrides, handed to the loop's hooks of the same names (the module docstring says when each
        # is called); a scheduler already made is used as it is
        hooks = {name: getattr(self, name) for name in HOOKED if _overrides(self, name)}
        hooks["evaluate"] = lambda: self._evaluate(self._trial, None)  # looked up when called: it may be patched
        if _overrides(self, "get_train_dataloader"):
            hooks["train_dataloader"] = lambda build: self._handing(build, self.get_train_dataloader)
        if _overrides(self, "get_eval_dataloader"):
            hooks["eval_dataloader"] = lambda name, build: self._handing(build, self.get_eval_dataloader, name)
        if self.lr_scheduler is not None:
            hooks.pop("create_scheduler", None)
        self._trial = trial  # model_init(trial), and the state's trial_params (as Trainer's train(trial=))
        try:
            result = self._train(resume_from_checkpoint, hooks)
        finally:
            self._run, self.control = None, self._callbacks.control  # the run is over, also when it raised
        self.fast = result.fast  # the levers the run used, and why the others stayed off (loop.fast.Plan)
        self._train_batch_size = self.state.train_batch_size or self._train_batch_size
        return TrainOutput(result.global_step, result.training_loss, result.metrics)

    def _run_config(self):
        """The run's settings: with TrainingArguments, Trainer's progress/printer and tracker callbacks report, so the
        loop's own bar and trackers stay off."""
        import dataclasses

        if not self._trainer_output:
            return self.config
        # and, as Trainer: a new run may write into an output_dir another run used (the loop's own refusal is for
        # its command line and loop.train: TrainingArguments have no overwrite_output_dir since transformers 5); a
        # checkpoint resumes under other batch settings, with a warning naming them (the loop's own refusal asks for
        # allow_inexact_resume); and only Trainer's files are written: no metrics.jsonl, no final model when
        # training ends (Trainer's users call save_model())
        return dataclasses.replace(
            self.config,
            disable_tqdm=True,
            report_to="none",
            reuse_output_dir=True,
            allow_inexact_resume=True,
            metrics_file=None,
            save_final_model=False,
        )

    def _train(self, resume_from_checkpoint, hooks):
        from .fit import train
        from .run import call_model_init

        # Trainer's rule: with a model_init, every train() starts from a fresh model (made after the seed is set)
        model_init = (
            self._trial_model
        )  # a search's trial: its model is made before its values are set (Trainer's order)
        if model_init is None and self.model_init is not None:
            model_init = lambda: call_model_init(self.model_init, self._trial)  # noqa: E731

        return train(
            self._run_config(),
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,  # one set, or a dict of named ones (each evaluated under eval_<name>_)
            data_collator=self.data_collator,
            compute_metrics=self.compute_metrics,
            callbacks=[*self._loop_callbacks, _Bind(self), self._callbacks],
            processing_class=self.processing_class,
            resume_from_checkpoint=resume_from_checkpoint,
            preprocess_logits_for_metrics=self.preprocess_logits_for_metrics,
            compute_loss_func=self.compute_loss_func,
            optimizers=(self.optimizer, self.lr_scheduler),
            optimizer_cls_and_kwargs=self.optimizer_cls_and_kwargs,
            model=None if model_init is not None else self.model,
            model_init=model_init,
            **hooks,
        )

    # ------------------------------------------------------------------ Trainer's helpers, for code that calls them
    def create_optimizer_and_scheduler(self, num_training_steps):
        """Trainer's: create_optimizer(), then create_scheduler() over `num_training_steps`."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps, optimizer=self.optimizer)

    def get_train_dataloader(self):
        """The training DataLoader the loop builds (Trainer's sampler, collator, column removal and workers),
        prepared by the Accelerator; the running one during train()."""
        if self._default_loader is not None:  # a subclass's super() call: a new loader of the loop's own
            return self._default_loader()
        if self.train_dataset is None:
            raise LoopError("Trainer: training requires a train_dataset")
        if self._run is not None:
            return self._run.loader
        return self._loader(self.train_dataset, "train")

    def get_eval_dataloader(self, eval_dataset=None):
        """The evaluation DataLoader of `eval_dataset` (or the Trainer's; a name picks one of a dict of them)."""
        if self._default_loader is not None:
            return self._default_loader()
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict):
            data = self.eval_dataset[eval_dataset]
        if data is None:
            raise LoopError("Trainer: evaluation requires an eval_dataset")
        if self._run is not None and data is self.eval_dataset and self._run.evaluator is not None:
            return self._run.evaluator
        # Trainer's rule: with persistent workers an eval set's loader is made once (its workers live on)
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        if self.config.dataloader_persistent_workers and key in self._eval_dataloaders:
            return self._eval_dataloaders[key]
        self._eval_dataloaders[key] = loader = self._loader(data, "eval")
        return loader

    def get_test_dataloader(self, test_dataset):
        if self._default_loader is not None:
            return self._default_loader()
        return self._loader(test_dataset, "eval")

    def _handing(self, build, method, *args):
        """A subclass's get_*_dataloader(*args), each of its super() calls returning a new loader from build()."""
        self._default_loader = build
        try:
            return method(*args)
        finally:
            self._default_loader = None

    def _loader(self, dataset, what):
        from .data import default_collator, default_label_names, eval_loader, prepare_dataset, train_loader

        model = self.model
        labels = list(self.config.label_names) if self.config.label_names is not None else default_label_names(model)
        collator = default_collator(self.data_collator, self.processing_class)
        data, collate = prepare_dataset(dataset, collator, model, self.config, labels, what)
        if what == "train":
            return train_loader(self.config, data, collate, self.accelerator)
        return eval_loader(self.config, data, collate, self.accelerator)

    def set_initial_training_values(self, args, dataloader):
        """Trainer's: (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples,
        total_train_batch_size, steps_in_epoch, max_steps) of training on `dataloader`, in the loop's plan
        (fit.make_plan, Trainer's arithmetic)."""
        from transformers.trainer_utils import has_length

        from .config import TrainConfig
        from .fit import make_plan

        config = self.config if args is self.args else args
        if not isinstance(config, TrainConfig):
            config = TrainConfig.from_training_arguments(args)
        plan = make_plan(config, dataloader)
        total = self.get_total_train_batch_size(args)
        if has_length(dataloader):
            examples = self.num_examples(dataloader)
            samples = plan.max_steps * total if config.max_steps > 0 else examples * config.num_train_epochs
        else:
            examples = samples = total * config.max_steps
        return plan.num_epochs, plan.updates_per_epoch, examples, samples, total, plan.steps_in_epoch, plan.max_steps

    def get_total_train_batch_size(self, args):
        """Trainer's: the examples of one optimizer step over every process."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return self._train_batch_size * args.gradient_accumulation_steps * world

    def num_examples(self, dataloader):
        """Trainer's: the examples a dataloader's dataset holds (or its batches times the batch size)."""
        try:
            return len(dataloader.dataset)
        except (TypeError, AttributeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def _get_output_dir(self, trial):
        """Trainer's: where this run's checkpoints go (a search trial's own folder during a search)."""
        return self.config.output_dir

    def _prepare_inputs(self, inputs):
        """Trainer's: the batch moved to the run's device."""
        from accelerate.utils import send_to_device

        return send_to_device(inputs, self.accelerator.device)

    def compute_loss_context_manager(self):
        """Trainer's: the context a loss is computed in. The loop's prepared model autocasts itself: nothing to add."""
        import contextlib

        return contextlib.nullcontext()

    def autocast_smart_context_manager(self, cache_enabled=True):
        import contextlib

        return contextlib.nullcontext()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's: (loss, logits, labels) of one batch, without gradients, as the loop's evaluation computes them."""
        from .evaluation import batch_prediction

        return batch_prediction(self._active_run("prediction_step"), model, inputs, prediction_loss_only, ignore_keys)

    def _load_callback_state(self):
        """Trainer's: the stateful callbacks and the TrainerControl restored from self.state.stateful_callbacks."""
        self._callbacks.load_state_dict(self.state.stateful_callbacks or {})
        self.control = self._callbacks.control

    def _loss_override(self):
        return self.compute_loss if _overrides(self, "compute_loss") else None

    def _active_run(self, what):
        if self._run is None:
            raise LoopError(f"Trainer.{what} runs inside train() (it needs the run's model and settings)")
        return self._run

    # ------------------------------------------------------------------ evaluation and prediction
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        from .evaluation import evaluate
        from .fit import evaluate_sets

        if self._run is not None and eval_dataset is None:  # an evaluation of the run (a subclass's super() call)
            return evaluate_sets(self._run)
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if data is None:
            raise LoopError("evaluate() needs an eval_dataset (here or given to the Trainer)")
        if isinstance(data, dict):
            metrics = {}
            for name, ds in data.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        metrics = self._inference(evaluate, data, metric_key_prefix, self.get_eval_dataloader, eval_dataset)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
        """Trainer's: one evaluation in training, whose metrics decide the best checkpoint and save_strategy="best"
        (the run's eval sets, or a subclass's evaluate())."""
        return self.evaluate(ignore_keys=ignore_keys_for_eval)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        from .evaluation import predict

        output = self._inference(predict, test_dataset, metric_key_prefix, self.get_test_dataloader, test_dataset)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics=output.metrics)
        return output

    def _inference(self, fn, data, metric_key_prefix, get_loader, dataset):
        """loop.evaluate or loop.predict on `data` with the Trainer's model, data handling, metrics and loss, and the
        loader a subclass's get_eval/test_dataloader(dataset) returns."""
        name = get_loader.__name__
        loader = (lambda build: self._handing(build, get_loader, dataset)) if _overrides(self, name) else None
        return fn(
            self.config,
            self.model,
            data,
            self.data_collator,
            self.compute_metrics,
            self.processing_class,
            self.preprocess_logits_for_metrics,
            self.compute_loss_func,
            metric_key_prefix=metric_key_prefix,
            compute_loss=self._loss_override(),
            dataloader=loader,
        )

    # ------------------------------------------------------------------ records and saving
    def log(self, logs, start_time=None):
        """Trainer.log: during training the run's record (epoch and token counts added, appended to log_history,
        written, on_log); outside training the epoch added, appended to state.log_history, on_log called."""
        if self._run is not None:
            self._run.records.emit(logs, start_time)
            return
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def save_model(self, output_dir=None, _internal_call=False):
        from .checkpoint import save_weights

        out = output_dir or self.config.output_dir
        os.makedirs(out, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(out, safe_serialization=True)
        else:
            save_weights(self.model.state_dict(), os.path.join(out, "model.safetensors"))
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(out)

    def save_state(self):
        if self.is_world_process_zero():  # Trainer's rule: one process writes
            self.state.save_to_json(os.path.join(self.config.output_dir, "trainer_state.json"))

    def is_world_process_zero(self):
        return self.state.is_world_process_zero

    def log_metrics(self, split, metrics):
        from transformers.trainer_pt_utils import log_metrics

        return log_metrics(self, split, metrics)

    def save_metrics(self, split, metrics, combined=True):
        from transformers.trainer_pt_utils import save_metrics

        os.makedirs(self.config.output_dir, exist_ok=True)
        return save_metrics(self, split, metrics, combined)

    def get_learning_rates(self):
        """Trainer's: the learning rate of each parameter group (ValueError before an optimizer exists)."""
        from transformers.trainer_pt_utils import get_learning_rates

        return get_learning_rates(self)

    def get_optimizer_group(self, param=None):
        """Trainer's: the parameter group holding `param`, or every group's parameters."""
        from transformers.trainer_pt_utils import get_optimizer_group

        return get_optimizer_group(self, param)

    def metrics_format(self, metrics):
        from transformers.trainer_pt_utils import metrics_format

        return metrics_format(self, metrics)

    # ------------------------------------------------------------------ hyperparameter search
    def hyperparameter_search(
        self,
        hp_space=None,
        compute_objective=None,
        n_trials=20,
        direction="minimize",
        backend=None,
        hp_name=None,
        **kwargs,
    ):
        """Trainer's hyperparameter_search, with Optuna (loop/search.py): each trial a run of the loop with the trial's
        values set on the arguments and a fresh model from model_init(trial), in <output_dir>/run-<number>. kwargs go
        to optuna.create_study, except timeout, n_jobs, gc_after_trial and catch (to study.optimize). Returns
        transformers' BestRun (a list for several directions; None on processes other than the first)."""
        from transformers.trainer_utils import default_compute_objective, default_hp_space_optuna

        from . import search

        search.check_backend(backend)
        if self.model_init is None:
            raise LoopError(
                "hyperparameter_search needs a model_init (each trial trains a fresh model): pass model_init="
            )
        self.hp_space = hp_space or default_hp_space_optuna
        self.hp_name = hp_name
        self.compute_objective = compute_objective or default_compute_objective
        optimize_kwargs = {k: kwargs.pop(k) for k in ("timeout", "n_jobs", "gc_after_trial", "catch") if k in kwargs}
        base = self.args, self.config
        self._search_args = copy.copy(self.args)  # what each trial's values are set on, in turn (Trainer's rule)
        try:
            return search.optimize(
                self._run_trial, self.hp_space, n_trials, direction, kwargs, optimize_kwargs, cpu=self.config.use_cpu
            )
        finally:
            self.args, self.config = base  # the arguments given, not the last trial's

    def _run_trial(self, trial):
        """One trial, in Trainer's order: the seed of the arguments as they stand (the previous trial's values), a
        fresh model from model_init(trial), then hp_space(trial) set on the arguments; the run in its own folder, the
        objective reported at each evaluation (search.Report); evaluated once at the end if it never was."""
        import dataclasses

        from transformers import set_seed

        from . import checkpoint as ckpt
        from . import search
        from .config import TrainConfig
        from .run import call_model_init

        args = self._search_args
        set_seed(args.seed)
        model = call_model_init(self.model_init, trial)
        streams = ckpt.rng_state()  # Trainer trains on from here: the run starts from these streams, not a new seed
        search.set_params(args, self.hp_space(trial), type(args).__name__)
        run_dir = os.path.join(args.output_dir, self.hp_name(trial) if self.hp_name else f"run-{trial.number}")
        if isinstance(args, TrainConfig):
            self.args = self.config = dataclasses.replace(args, output_dir=run_dir)
        else:
            self.args = args
            self.config = dataclasses.replace(TrainConfig.from_training_arguments(args), output_dir=run_dir)
        self._callbacks.args = self.args

        def made():  # loop.train's model_init: the model already made, and the streams as they were after it
            ckpt.set_rng_state(streams)
            return model

        report = search.Report(trial, self.compute_objective)
        self._loop_callbacks.append(report)
        self._trial_model = made
        try:
            self.train(trial=trial)
        finally:
            self._loop_callbacks.remove(report)
            self._trial_model = None
        if report.objective is None:
            return self.compute_objective(self.evaluate())
        return report.objective


class _Bind(Callback):
    """Hands the running loop's objects to the Trainer (model, optimizer, scheduler, accelerator, the run for
    compute_loss/training_step) when training begins."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, run):
        t = self.trainer
        t._run, t.accelerator = run, run.accelerator
        t.model, t.model_wrapped = run.unwrapped, run.model
        t.optimizer, t.lr_scheduler = run.optimizer, run.scheduler
        if not isinstance(t.args, type(t.config)):  # checkpoints pickle the TrainingArguments given, as Trainer's
            run.training_args = t.args
        if t._trainer_output and run.resumed_from is not None:
            _compare_checkpoint_args(t.args, run.resumed_from)
        if t._trial is not None:  # TrainerState.trial_params and trial_name, as Trainer keeps them
            from .search import trial_params

            run.trial_params = trial_params(t._trial)
            run.trial_name = t.hp_name(t._trial) if getattr(t, "hp_name", None) else None


def _compare_checkpoint_args(args, checkpoint):
    """Trainer's warning, in its words, for each of logging/eval/save steps and the batch size that differs from
    what the checkpoint's trainer_state.json recorded."""
    from transformers.trainer_callback import TrainerState

    try:
        from transformers.trainer_utils import compare_trainer_and_checkpoint_args
    except ImportError:  # a transformers without it has no such warning to give
        return
    path = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(path):
        compare_trainer_and_checkpoint_args(args, TrainerState.load_from_json(path))


def _overrides(obj, name) -> bool:
    return getattr(type(obj), name, None) is not getattr(Trainer, name, None)
