"""`TrainConfig`: every knob of a run, with `transformers.TrainingArguments`' names and defaults.

Fields come in two groups. The *Trainer* group mirrors a TrainingArguments field of the same name, default and
meaning, so that `TrainConfig.from_training_arguments(args)` and `.to_training_arguments()` round-trip. The *loop*
group holds what Trainer does not have (EMA, telemetry, resume policy, the fast path's levers); each is off or inert
by default so that a config built from TrainingArguments reproduces Trainer's numbers.

One job a module:
  config.py             the fields, their types (and the CLI/YAML values coerced to them), derived values
  trainer_rules.py      Trainer's default rules: what TrainingArguments fills in when a field is left unset
  validation.py         each component's checks: one line for the first problem, before any model is touched
  training_arguments.py the TrainingArguments bridge, the refused fields (REFUSED) and the coverage table
  fast.py               what `fast` turns on for a run (a TrainConfig records what was asked, and rewrites nothing)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields

from .errors import LoopError
from .training_arguments import REFUSED, coverage  # noqa: F401 (the bridge's tables, importable from here)

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",  # transformers' GreedyLR, in the transformers versions that have it (validation checks)
)
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "sgd", "adafactor", "adagrad", "rmsprop")
INTERVALS = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
SAMPLING = ("random", "sequential", "group_by_length")
LOG_LEVELS = ("passive", "debug", "info", "warning", "error", "critical", "detail")
DDP_BACKENDS = ("nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl")  # TrainingArguments' choices
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def _f(default, help: str, group: str = "trainer", note: str = "", choices=None):
    meta = {"help": help, "group": group, "note": note, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def compile_records_graphs(config) -> str | None:
    """Why cuda_graph_step cannot go with this compile mode (it records CUDA graphs itself), or None."""
    if config.torch_compile_mode in ("reduce-overhead", "max-autotune"):
        return (
            f"torch_compile_mode {config.torch_compile_mode} records CUDA graphs of its own; use the default "
            "mode with cuda_graph_step, or set cuda_graph_step false"
        )
    return None


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- Trainer group: what is trained, how long
    output_dir: str = _f("trainer_output", "Where checkpoints, metrics.jsonl and the final model are written.")
    per_device_train_batch_size: int = _f(8, "Micro-batch size per device (process) for training.")
    per_device_eval_batch_size: int = _f(8, "Batch size per device for evaluation.")
    auto_find_batch_size: bool = _f(
        False,
        "On running out of device memory, start the run again with 0.9x the per-device batch (accelerate's "
        "find_executable_batch_size, as Trainer); a resume starts from the batch its checkpoint recorded.",
    )
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated into one optimizer step.")
    num_train_epochs: float = _f(3.0, "Epochs to train (fractional allowed); ignored when max_steps > 0.")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0.")
    # ---------------------------------------------------------------- optimizer and schedule
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    optim: str = _f("adamw_torch_fused", "Optimizer.", choices=OPTIMIZERS)
    optim_args: typing.Optional[str] = _f(
        None, "Extra optimizer arguments 'k=v,k=v' (sgd/adagrad/rmsprop keys as Trainer)."
    )
    weight_decay: float = _f(
        0.0, "Decoupled weight decay; not applied to biases and norm weights (Trainer's grouping)."
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(
        1.0, "Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."
    )
    lr_scheduler_type: str = _f("linear", "Any scheduler of transformers.get_scheduler.", choices=SCHEDULERS)
    lr_scheduler_kwargs: typing.Optional[dict] = _f(None, "Extra scheduler arguments (JSON object on the CLI).")
    warmup_steps: float = _f(0, "Warmup steps; a value < 1 is a ratio of the total steps (Trainer's rule).")
    label_smoothing_factor: float = _f(0.0, "Label smoothing epsilon (Trainer's LabelSmoother).")
    average_tokens_across_devices: bool = _f(True, "Normalise the loss by target items summed over all ranks.")
    # ---------------------------------------------------------------- precision and speed
    bf16: bool = _f(False, "bf16 mixed precision through the Accelerator.")
    fp16: bool = _f(False, "fp16 mixed precision with a dynamic grad scaler through the Accelerator.")
    tf32: typing.Optional[bool] = _f(None, "Allow TF32 matmuls on Ampere+ GPUs (None: leave torch's default).")
    gradient_checkpointing: bool = _f(
        False, "Activation (gradient) checkpointing via model.gradient_checkpointing_enable."
    )
    gradient_checkpointing_kwargs: typing.Optional[dict] = _f(None, "Arguments for torch.utils.checkpoint.")
    torch_compile: bool = _f(False, "Compile the model with torch.compile through the Accelerator.")
    torch_compile_backend: typing.Optional[str] = _f(None, "torch.compile backend (default inductor).")
    torch_compile_mode: typing.Optional[str] = _f(None, "torch.compile mode.", choices=COMPILE_MODES)
    torch_empty_cache_steps: typing.Optional[int] = _f(None, "Empty the device cache every N steps.")
    use_cpu: bool = _f(False, "Train on the CPU even when a GPU is present.")
    use_cache: bool = _f(False, "Value written to model.config.use_cache during training (Trainer's).")
    neftune_noise_alpha: typing.Optional[float] = _f(
        None,
        "NEFTune: in training, add uniform noise of magnitude alpha/sqrt(sequence length x hidden size) to the "
        "input embeddings (Trainer's hook, removed when training ends; evaluation sees no noise).",
    )
    # ---------------------------------------------------------------- data
    seed: int = _f(42, "Seed set before anything random happens.")
    data_seed: typing.Optional[int] = _f(None, "Separate seed for the data sampler.")
    full_determinism: bool = _f(False, "Deterministic algorithms everywhere (slower).")
    dataloader_drop_last: bool = _f(False, "Drop the last incomplete batch.")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.")
    dataloader_pin_memory: bool = _f(True, "Pin host memory for faster copies to the GPU.")
    dataloader_persistent_workers: bool = _f(False, "Keep eval/train workers alive between epochs.")
    dataloader_prefetch_factor: typing.Optional[int] = _f(None, "Batches prefetched per worker.")
    dataloader_multiprocessing_context: typing.Optional[str] = _f(
        None, "Multiprocessing start method for workers.", choices=("fork", "spawn", "forkserver")
    )
    dataloader_in_order: bool = _f(True, "Workers return batches in order.")
    remove_unused_columns: bool = _f(True, "Drop dataset columns the model's forward does not accept.")
    label_names: typing.Optional[list] = _f(None, "Input keys holding the labels (default: inferred from the model).")
    train_sampling_strategy: str = _f("random", "Train sampler.", choices=SAMPLING)
    length_column_name: str = _f("length", "Precomputed length column for group_by_length.")
    # ---------------------------------------------------------------- logging
    logging_strategy: str = _f("steps", "When to log the training loss.", choices=INTERVALS)
    logging_steps: float = _f(500, "Log every N steps (a value < 1 is a ratio of the total steps).")
    logging_first_step: bool = _f(False, "Also log after the first step.")
    logging_nan_inf_filter: bool = _f(True, "Replace a nan/inf micro-batch loss by the running average when logging.")
    include_num_input_tokens_seen: str = _f(
        "no", "Track input tokens seen: no, all or non_padding.", choices=("no", "all", "non_padding")
    )
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    report_to: typing.Union[list, str] = _f("none", "Trackers to hand records to (accelerate trackers), or none.")
    run_name: typing.Optional[str] = _f(None, "Run name for trackers.")
    project: str = _f("huggingface", "Project name for trackers.")
    log_level: str = _f(
        "passive", "transformers' log level in the process that logs (passive keeps the library's).", choices=LOG_LEVELS
    )
    log_level_replica: str = _f("warning", "transformers' log level in the other processes.", choices=LOG_LEVELS)
    log_on_each_node: bool = _f(
        True,
        "The first process of every node takes log_level (false: rank 0 only); records "
        "are written by rank 0 either way.",
    )
    debug: str = _f(
        "",
        "Debug features, space-separated: underflow_overflow (transformers' DebugUnderflowOverflow on "
        "every module during training: the first inf/nan in a forward prints the last frames' absolute "
        "min/max and stops the run; one host sync per module).",
    )
    skip_memory_metrics: bool = _f(
        True,
        "Trainer's memory tracker; the loop reports peak memory in telemetry instead.",
        note="the loop's telemetry reports peak device memory in every record",
    )
    # ---------------------------------------------------------------- evaluation
    eval_strategy: str = _f("no", "When to evaluate.", choices=INTERVALS)
    eval_steps: typing.Optional[float] = _f(None, "Evaluate every N steps (default logging_steps; < 1 is a ratio).")
    eval_delay: float = _f(0, "Steps (or epochs) to wait before the first evaluation.")
    eval_on_start: bool = _f(False, "Evaluate once before training.")
    prediction_loss_only: bool = _f(False, "Evaluation returns the loss only (no predictions for metrics).")
    eval_accumulation_steps: typing.Optional[int] = _f(None, "Move predictions to the CPU every N eval batches.")
    bf16_full_eval: bool = _f(
        False,
        "evaluate()/predict() outside a training run cast the model to bf16 first (in "
        "place, as Trainer does); evaluations during training are unchanged.",
    )
    fp16_full_eval: bool = _f(False, "As bf16_full_eval, in fp16.")
    include_for_metrics: list = _f(
        [],
        "Also hand compute_metrics the model inputs ('inputs') and/or the per-sample "
        "losses ('loss'), as EvalPrediction.inputs / .losses.",
    )
    batch_eval_metrics: bool = _f(
        False,
        "Call compute_metrics(eval_pred, compute_result) once a batch instead of on the "
        "whole set (compute_result True on the last batch); predictions are not kept.",
    )
    eval_do_concat_batches: bool = _f(True, "Concatenate predictions across batches (false: one array per batch).")
    eval_use_gather_object: bool = _f(
        False, "Gather predictions across processes as Python objects (predictions that are not tensors)."
    )
    metric_for_best_model: typing.Optional[str] = _f(
        None, "Metric that picks the best checkpoint and drives early stopping."
    )
    greater_is_better: typing.Optional[bool] = _f(None, "Whether a larger metric_for_best_model is better.")
    # ---------------------------------------------------------------- checkpoints
    save_strategy: str = _f("steps", "When to save a checkpoint.", choices=SAVE_STRATEGIES)
    save_steps: float = _f(500, "Save every N steps (a value < 1 is a ratio of the total steps).")
    save_total_limit: typing.Optional[int] = _f(
        None, "Keep at most N checkpoints (never deleting the best or the newest)."
    )
    save_only_model: bool = _f(False, "Checkpoints hold only the weights (no resume).")
    save_on_each_node: bool = _f(
        False,
        "Several nodes without a shared filesystem: each node's first process writes "
        "checkpoints and the final model into its own output_dir (one shared folder is "
        "refused); resume 'latest' takes the newest checkpoint whole on every node. Not "
        "with FSDP/DeepSpeed.",
    )
    load_best_model_at_end: bool = _f(False, "Load the best checkpoint's weights at the end.")
    ignore_data_skip: bool = _f(
        False, "On resume, start the epoch's data from the beginning instead of the saved position."
    )
    restore_callback_states_from_checkpoint: bool = _f(False, "Restore stateful callbacks from the checkpoint.")
    enable_jit_checkpoint: bool = _f(
        False,
        "On SIGTERM (preemption), save a complete checkpoint at the next step "
        "boundary and stop (exit status 143, no final model); resume with 'latest'.",
    )
    resume_from_checkpoint: typing.Optional[str] = _f(None, "Checkpoint to resume from: a path, 'latest' or 'true'.")
    # ---------------------------------------------------------------- distributed (DDP knobs; topology comes from `accelerate launch`)
    ddp_find_unused_parameters: typing.Optional[bool] = _f(None, "DDP find_unused_parameters.")
    ddp_bucket_cap_mb: typing.Optional[int] = _f(None, "DDP bucket size.")
    ddp_broadcast_buffers: typing.Optional[bool] = _f(None, "DDP broadcast_buffers.")
    ddp_static_graph: typing.Optional[bool] = _f(None, "DDP static_graph.")
    ddp_timeout: int = _f(1800, "Collective timeout in seconds.")
    accelerator_config: typing.Optional[dict] = _f(
        None,
        "accelerate's settings as Trainer takes them (JSON object on the CLI): split_batches, dispatch_batches, "
        "even_batches, use_seedable_sampler, non_blocking, and gradient_accumulation_kwargs (num_steps sets "
        "gradient_accumulation_steps when that is 1; sync_each_batch all-reduces every micro-batch).",
    )
    ddp_backend: typing.Optional[str] = _f(
        None,
        "Process-group backend (None: accelerate's choice, nccl on CUDA GPUs and gloo on CPUs).",
        choices=DDP_BACKENDS,
    )

    # ================================================================ loop group: what Trainer lacks
    ema_decay: float = _f(0.0, "EMA of the weights with this decay (0 disables).", group="loop")
    ema_warmup: bool = _f(False, "Use decay_t = min(ema_decay, (1+t)/(10+t)).", group="loop")
    ema_start_step: int = _f(
        0, "Optimizer step from which the EMA is updated (before it, it tracks the weights).", group="loop"
    )
    ema_on_cpu: bool = _f(False, "Keep the EMA on the CPU instead of the training device.", group="loop")
    telemetry: bool = _f(
        True, "Add tokens/s, samples/s, step time, peak memory and MFU under `loop/` keys to each record.", group="loop"
    )
    peak_tflops: typing.Optional[float] = _f(
        None, "Device peak TFLOP/s for MFU (default: looked up from the GPU name).", group="loop"
    )
    early_stopping_patience: typing.Optional[int] = _f(
        None, "Stop after this many evaluations without improvement of metric_for_best_model.", group="loop"
    )
    early_stopping_threshold: float = _f(
        0.0, "Improvement smaller than this does not count (early stopping).", group="loop"
    )
    stop_on_nonfinite: bool = _f(
        True,
        "Stop with an error (exit status 2) once the loss or grad norm turns non-finite "
        "(bf16/fp32; fp16 overflow skips don't count), noticed at the next log/eval/save "
        "boundary; nothing is saved from non-finite weights. False: carry on as Trainer does.",
        group="loop",
    )
    allow_inexact_resume: bool = _f(
        False,
        "Resume even if batch geometry or dataset length changed (data position is then approximate).",
        group="loop",
    )
    overwrite_output_dir: bool = _f(
        False,
        "A new run (not a resume) into an output_dir that holds another run's records, checkpoints or final "
        "model is refused; true deletes those first (other files in the folder are left alone).",
        group="loop",
    )
    reuse_output_dir: bool = _f(
        False,
        "Train into an output_dir that holds another run, as Trainer does: checkpoints and a final model of the same "
        "names are replaced, the others kept, and the other run's metrics.jsonl is moved aside to "
        "metrics-<time>.jsonl. loop.Trainer turns it on when given TrainingArguments.",
        group="loop",
    )
    param_groups: typing.Optional[list] = _f(
        None,
        "Parameter groups chosen by name: a list of {pattern: REGEX, learning_rate: X, weight_decay: Y, name: N} "
        "(JSON on the CLI). A parameter joins the first entry whose pattern it matches (re.search), else the default "
        "groups; each group follows the schedule scaled to its own peak and is logged as learning_rate/<name>.",
        group="loop",
    )
    fast: bool = _f(
        False,
        "The fast path: turns on torch_compile (not where batch widths vary and the step is "
        "recorded: there the eager step is recorded, which is faster short of ~40,000 steps; name a "
        "torch_compile_mode to compile anyway), fused AdamW (optim adamw_torch becomes "
        "adamw_torch_fused, the same algorithm), fused_linear_cross_entropy where the model "
        "supports it (causal LMs), varlen_attention on packed rows, skip_causal_mask on plain causal rows, "
        "dataset_on_device where it applies "
        "(when batch widths vary: cuDNN attention left out, compiled once with dynamic shapes), "
        "cuda_graph_step where it applies (one CUDA process, the training set on the device), and DDP without "
        "find_unused_parameters (unless set) with gradients as bucket views and the compiled model as one "
        "graph (ddp_compile_overlap false unless set). Same numbers within bf16 run-to-run spread; `loop compare` lists what it turned on.",
        group="loop",
    )
    fused_linear_cross_entropy: bool = _f(
        False,
        "Causal LMs: compute the training loss from the last hidden states "
        "chunk by chunk, never materialising the logits, with the head's GEMMs on a "
        "vocabulary padded to a multiple of 64 (loop/fused_loss.py). Evaluation "
        "is unchanged.",
        group="loop",
    )
    dataset_on_device: bool = _f(
        False,
        "Collate the whole training set once and keep it on the accelerator; each "
        "batch is cut from it there (same order and batches as the default loader, checked "
        "on sample batches; no loader workers, no per-batch host copy). For map-style sets "
        "up to 2 GiB collated; `fast` turns it on where it applies.",
        group="loop",
    )
    attention_backends: typing.Optional[str] = _f(
        None,
        "The scaled_dot_product_attention kernels the model may use, a comma list of flash, efficient, cudnn, "
        "math (torch.nn.attention.sdpa_kernel around every forward); None: PyTorch's choice. `fast` leaves out cudnn "
        "when the batches vary in width (cuDNN builds a new plan per shape: most of the step for SST-2).",
        group="loop",
    )
    cuda_graph_step: typing.Optional[bool] = _f(
        None,
        "Record the whole optimizer step (forward, backward, clip, optimizer) as one "
        "CUDA graph per batch shape and replay it: the first two windows of a shape run eagerly, "
        "the third is recorded. One CUDA process, not fp16, torch's Adam family, no pinned host "
        "batches; verified with dataset_on_device (compiled or eager) and unpinned host batches "
        "(compiled). None: on under `fast` where it applies; false: off even under fast "
        "(loop/graph_step.py).",
        group="loop",
    )
    varlen_attention: typing.Optional[bool] = _f(
        None,
        "Causal LMs on packed rows (position_ids restarting per document, "
        "no attention_mask): attention through PyTorch's variable-length flash kernel, one "
        "sequence per document, dropout included, instead of SDPA with a dense block-diagonal "
        "mask. CUDA, bf16/fp16. None: on under `fast` where it applies; false: off even under "
        "fast (loop/varlen_attention.py).",
        group="loop",
    )
    skip_causal_mask: typing.Optional[bool] = _f(
        None,
        "Causal LMs on plain rows (no attention_mask, no position_ids: group_texts): no dense causal mask, "
        "SDPA with is_causal as in eager mode (under torch.compile transformers builds the [batch, 1, T, T] mask, "
        "and SDPA's kernels then compute its masked half). None: on under `fast` where it applies; false: off "
        "even under fast (loop/causal_attention.py).",
        group="loop",
    )
    ddp_compile_overlap: typing.Optional[bool] = _f(
        None,
        "torch_compile under DDP: true (torch's default) splits the compiled model at DDP's bucket boundaries "
        "(dynamo's DDP optimizer) so that each bucket's all-reduce overlaps the rest of the backward; false compiles "
        "one graph and all-reduces when the backward is done (torch._dynamo.config.optimize_ddp False during the run, "
        "put back after it): no overlap, but the backward keeps its fusions and the whole GPU. None: torch's default, "
        "or false under `fast` (faster on one host's GPUs; docs/benchmarks/).",
        group="loop",
    )
    sharded_optimizer: bool = _f(
        False,
        "Under DDP with several processes: the optimizer sharded over the ranks (ZeRO-1). Each bucket of gradients "
        "is reduce-scattered as soon as the last micro-batch's backward has finished it, each rank steps the "
        "optimizer on its own shard (1/R of the state) and the updated shards are all-gathered into the parameters. "
        "The same numbers as DDP within fp32 rounding (loop/zero.py). Elementwise optimizers only (AdamW, SGD, "
        "Adagrad, RMSprop); not with fp16, FSDP or DeepSpeed.",
        group="loop",
    )
    grad_reduce_dtype: typing.Optional[str] = _f(
        None,
        "Reduce the gradients across processes in this dtype (bf16: half the bytes; the numbers change within "
        "bf16's rounding): DDP's bf16 compression hook, or the sharded optimizer's reduce-scatter. None: fp32.",
        group="loop",
        choices=("bf16",),
    )
    metrics_file: str | None = _f(
        "metrics.jsonl",
        "File in output_dir that receives every record as one JSON line; none: no file (loop.Trainer given "
        "TrainingArguments writes Trainer's files only).",
        group="loop",
    )
    save_final_model: bool = _f(
        True,
        "Write the final model (and ema/) to output_dir when training ends, as "
        "trainer.save_model() after training does; false for benchmarks and sweeps that keep "
        "no model (`loop bench` and `loop compare` set it).",
        group="loop",
    )

    def __post_init__(self):
        self._coerce_types()
        self.validate()  # what `fast` turns on is decided per run, in loop/fast.py: the fields keep what was asked

    # ------------------------------------------------------------------ validation (runs before any model is touched)
    def _coerce_types(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.report_to = [t for t in self.report_to if t not in ("none", "")]
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"

    def validate(self):
        """Trainer's default rules (they fill in what Trainer would), then each component's checks: one clear line
        for the first problem, before any model is touched."""
        from . import trainer_rules, validation

        trainer_rules.apply(self)
        validation.check(self)

    # ------------------------------------------------------------------ derived values
    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def warmup_for(self, total_steps: int) -> int:
        """Trainer's rule: an integer is a step count, a value < 1 a ratio of the total steps."""
        return int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(total_steps * self.warmup_steps)

    def steps_for(self, name: str, total_steps: int):
        """logging/eval/save steps as an int; a value < 1 is a ratio of total steps (Trainer's compute_steps)."""
        value = getattr(self, f"{name}_steps")
        if value is None:
            return None
        return math.ceil(total_steps * value) if value < 1 else int(value)

    def loop_features(self) -> list[str]:
        """Loop-only features that are switched on (reported by `loop compare`)."""
        on = []
        if self.ema_decay > 0:
            on.append(f"ema (decay {self.ema_decay})")
        if self.telemetry:
            on.append("telemetry (extra loop/ keys in records; numbers unchanged)")
        if self.allow_inexact_resume:
            on.append("allow_inexact_resume")
        if self.sharded_optimizer:
            on.append("sharded_optimizer (ZeRO-1 under DDP)")
        if self.grad_reduce_dtype:
            on.append(f"grad_reduce_dtype {self.grad_reduce_dtype} (changes the numbers)")
        if self.param_groups:
            on.append("param_groups (" + ", ".join(e.get("name", e["pattern"]) for e in self.param_groups) + ")")
        return on

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ TrainingArguments round-trip (training_arguments.py)
    @classmethod
    def from_training_arguments(cls, args, **loop_fields) -> "TrainConfig":
        """Mirror `args`; refuse (naming it) any field the loop does not implement that is set to a non-default value.
        Loop-only features stay off (parity mode: telemetry keys are not added) unless passed in `loop_fields`."""
        from .training_arguments import from_training_arguments

        return from_training_arguments(cls, args, **loop_fields)

    def to_training_arguments(self, **overrides):
        """The TrainingArguments that make Trainer run this configuration."""
        from .training_arguments import to_training_arguments

        return to_training_arguments(self, **overrides)


# ---------------------------------------------------------------------- value coercion (CLI strings, YAML values)
def coerce(name, value, hint):
    """Turn a CLI/YAML value into the field's type, or raise one clear line."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union or origin is types.UnionType:
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        last_error = None
        for arg in args:
            try:
                return coerce(name, value, arg)
            except LoopError as e:
                last_error = e
        raise last_error
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, float) and value != int(value):
                raise ValueError
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
                if value != int(value):
                    raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if hint in (dict, list) or typing.get_origin(hint) in (dict, list):
            target = typing.get_origin(hint) or hint
            parsed = value
            if isinstance(value, str):
                import json

                parsed = (
                    json.loads(value) if value.strip()[:1] in "[{" else (value.split(",") if target is list else None)
                )
            if not isinstance(parsed, target):
                raise ValueError
            return parsed
    except (ValueError, TypeError):
        pass
    else:
        return value
    kind = getattr(hint, "__name__", str(hint))
    raise LoopError(f"{name}={value!r} is not a valid {kind}; pass a {kind} value, e.g. --{name} {_example(hint)}")


def _example(hint):
    return {bool: "true", int: "8", float: "0.1", str: "text", dict: "'{\"k\": 1}'", list: "a,b"}.get(hint, "VALUE")
