"""`fast`, resolved once: which speed levers a run uses, and for each one left off, why.

`TrainConfig` keeps what was asked for (`fast`, and each lever's own field) and rewrites none of it. This module is
the only reader of `config.fast`. `resolve()` turns it, the explicit fields, the model, the data, the optimizer and the
Accelerator into a frozen `Plan`, deciding in the order build() needs the answers:

  0. optimizer          `optim adamw_torch` becomes `adamw_torch_fused` (the same AdamW in one kernel).
                        Decided by `optimizer_name()` before the optimizer exists; the plan records it.
  1. dataset_on_device  the training set collated once and kept on the device: decides the loader.
  2. fused_linear_cross_entropy   the training loss from the last hidden states: patches the model before prepare().
  3. varlen_attention   the flash varlen kernel for packed rows: needs the collated data (the table, or collated here).
     skip_causal_mask   SDPA's is_causal for plain causal rows (no mask built under compile): needs the same data.
  4. attention_backends the SDPA kernels; `fast` leaves cuDNN out when batch widths vary (a new plan per shape).
  5. cuda_graph_step    the whole step as one CUDA graph: needs the optimizer and the table.
  6. torch_compile      compiled by prepare(); dynamic shapes when widths vary; not at all when widths vary and the
                        step is recorded (compiling with dynamic shapes pays only over tens of thousands of steps),
                        unless a compile mode or backend is named.
  7. DDP                no unused-parameter search, gradients as bucket views, one compiled graph (no dynamo DDP
                        optimizer for the length of the run).
  8. evaluation         in training, on the uncompiled module, as Trainer's evaluation_loop does (it takes self.model,
                        not the compiled model_wrapped): Trainer's numbers, and no compilation per evaluation shape
                        (grad mode, eval batch size, a short last batch); outside training (loop.evaluate/predict)
                        compiled like Trainer's prepare_model, except under `fast`.

A lever asked for explicitly where it cannot run is refused with one line (by resolve, before anything is changed);
through `fast` it is left off, and the plan says why. `apply()` then makes the changes, in the same order, on the model
(undone after the run by model_changes.ModelChanges) and the Accelerator. `loop compare`, `loop bench`, the training
records' checkpoints and `TrainResult.plan` report the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from .errors import LoopError

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


@dataclasses.dataclass(frozen=True)
class Lever:
    on: bool
    why: str  # what turned it on ("asked for", "fast"), or why it is off

    def __str__(self):
        return f"{'on' if self.on else 'off'} ({self.why})"


@dataclasses.dataclass(frozen=True)
class Plan:
    fast: bool
    optim: str
    dataset_on_device: Lever
    fused_linear_cross_entropy: Lever
    varlen_attention: Lever
    varlen_segments: int | None  # the per-batch document bound the varlen kernel is sized for
    skip_causal_mask: Lever
    attention_backends: str | None
    cuda_graph_step: Lever
    torch_compile: Lever
    compile_dynamic: bool
    ddp_find_unused_parameters: bool | None  # None: accelerate's rule (not gradient_checkpointing)
    gradient_as_bucket_view: bool
    ddp_compile_overlap: bool | None  # None: torch's default
    evaluate_eagerly: bool

    def to_dict(self) -> dict:
        """Every decision, a lever as "on (why)" / "off (why)": what checkpoints and `loop compare` record."""
        values = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: str(v) if isinstance(v, Lever) else v for name, v in values}

    def report(self) -> list[str]:
        """One line a lever that is on, for `loop compare`/`loop bench` (the off ones and why: to_dict())."""
        on = [
            f"{f.name}"
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Lever) and getattr(self, f.name).on
        ]
        if self.optim == "adamw_torch_fused" and self.fast:
            on.append("optim adamw_torch_fused")
        if self.attention_backends:
            on.append(f"attention_backends {self.attention_backends}")
        if self.gradient_as_bucket_view:
            on.append("gradient_as_bucket_view")
        if self.ddp_compile_overlap is not None and self.torch_compile.on:
            on.append(f"ddp_compile_overlap {str(self.ddp_compile_overlap).lower()}")
        return on

    def ddp_overlap(self):
        """ddp_compile_overlap for the length of one train() call: torch's setting is process-wide (read when the
        compiled model first runs under DDP, and at any recompilation), so it is put back afterwards."""
        if not self.torch_compile.on or self.ddp_compile_overlap is None:
            return contextlib.nullcontext()
        from torch import _dynamo

        return _dynamo.config.patch(optimize_ddp=self.ddp_compile_overlap)

    def attention(self):
        """The context every forward runs in: torch.nn.attention.sdpa_kernel(attention_backends), or nothing."""
        return attention_context(self.attention_backends)


def optimizer_name(config) -> str:
    """Step 0: the optimizer the loop builds by name (Trainer's create_optimizer is given the same one by compare)."""
    return "adamw_torch_fused" if config.fast and config.optim == "adamw_torch" else config.optim


def trainer_settings(config) -> dict:
    """What `fast` means for Trainer's side of `loop compare`: compiled, with the same optimizer."""
    if not config.fast:
        return {}
    settings = {"torch_compile": True, "optim": optimizer_name(config)}
    if config.ddp_find_unused_parameters is None:
        settings["ddp_find_unused_parameters"] = False
    return settings


def evaluates_eagerly(config, in_training: bool) -> bool:
    """Step 8: whether evaluation runs the module itself rather than its compiled wrapper."""
    return in_training or bool(config.fast)


def widths_vary(device_table) -> bool:
    """Training batches of varying width (dynamic padding), as the device table knows them."""
    return getattr(device_table, "lengths", None) is not None


def attention_context(names):
    if not names:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return functools.partial(sdpa_kernel, [getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names.split(",")])


def _asked(value, fast: bool) -> tuple[bool, bool]:
    """(wanted, required): asked for explicitly (refuse what cannot run), or through `fast` (None means 'fast')."""
    return bool(value) or (fast and value is None), bool(value)


def resolve(
    config,
    accelerator,
    model,
    train_dataset,
    collate,
    optimizer,
    *,
    own_loss: bool,
    custom_step: bool,
    main_input: str = "input_ids",
    step_events: bool = False,
) -> tuple[Plan, object]:
    """The run's Plan, and the device table (or None) the loader is built on: one decision a lever, in build()'s
    order. Raises one line for a lever asked for explicitly that cannot serve this run. Changes nothing: apply() does."""
    table, dataset_on_device = dataset_lever(config, accelerator, train_dataset, collate, main_input)
    fused = fused_loss_lever(config, accelerator, model, own_loss)
    varlen, segments = varlen_lever(config, accelerator, model, table, train_dataset, collate)
    skip_mask = skip_mask_lever(config, model, table, train_dataset, collate, varlen)
    graph = graph_lever(config, accelerator, optimizer, table, custom_step, step_events)
    compiled, dynamic = compile_lever(config, table, graph)
    find_unused, bucket_view, overlap = ddp_levers(config)
    plan = Plan(
        fast=config.fast,
        optim=optimizer_name(config),
        dataset_on_device=dataset_on_device,
        fused_linear_cross_entropy=fused,
        varlen_attention=varlen,
        varlen_segments=segments,
        skip_causal_mask=skip_mask,
        attention_backends=attention_backends(config, table),
        cuda_graph_step=graph,
        torch_compile=compiled,
        compile_dynamic=dynamic,
        ddp_find_unused_parameters=find_unused,
        gradient_as_bucket_view=bucket_view,
        ddp_compile_overlap=overlap,
        evaluate_eagerly=evaluates_eagerly(config, in_training=True),
    )
    return plan, table


def dataset_lever(config, accelerator, dataset, collate, main_input="input_ids"):
    """1. (device table or None, Lever): a plain bool field: `fast` turns it on where it applies."""
    from .data import on_device_table

    table = on_device_table(
        config,
        dataset,
        collate,
        accelerator.device,
        main_input,
        wanted=config.dataset_on_device or config.fast,
        required=config.dataset_on_device,
    )
    if table is not None:
        return table, Lever(True, "asked for" if config.dataset_on_device else "fast")
    return None, Lever(
        False,
        "not asked for"
        if not config.fast
        else "the training set cannot be served from the device (asked for, dataset_on_device says why)",
    )


def fused_loss_lever(config, accelerator, model, own_loss: bool) -> Lever:
    """2. The fused linear cross-entropy: the model's own loss only, for the causal LMs it supports."""
    from . import fused_loss
    from .run import topology

    if config.fused_linear_cross_entropy and own_loss:
        raise LoopError(
            "fused_linear_cross_entropy computes the model's own loss; it cannot serve a "
            "compute_loss_func or label_smoothing_factor; set fused_linear_cross_entropy false"
        )
    why = fused_loss.refusal(model, topology(accelerator))
    if config.fused_linear_cross_entropy:
        if why:
            raise LoopError(
                f"fused_linear_cross_entropy cannot be used here: {why}; set fused_linear_cross_entropy false"
            )
        return Lever(True, "asked for")
    if not config.fast:
        return Lever(False, "not asked for")
    if own_loss:
        return Lever(False, "a compute_loss_func or label smoothing computes the loss")
    return Lever(why is None, why or "fast")


def varlen_lever(config, accelerator, model, table, dataset, collate) -> tuple[Lever, int | None]:
    """3. (Lever, per-batch document bound): counted over the collated training set (the table, or collated here)."""
    from . import varlen_attention as va

    wanted, required = _asked(config.varlen_attention, config.fast)
    if not wanted:
        return Lever(False, "varlen_attention false" if config.varlen_attention is False else "not asked for"), None
    batches, first, why = _training_batches(table, dataset, collate)
    if why is None:
        why = va.why_not(model, accelerator.device, config.mixed_precision, first)
    if why and required:
        raise LoopError(f"varlen_attention cannot be used here: {why}; set varlen_attention false")
    if why:
        return Lever(False, why), None
    segments = va.segment_bound(va.count_documents([first, *batches]), config.per_device_train_batch_size)
    return Lever(True, "asked for" if required else "fast"), segments


def _training_batches(table, dataset, collate):
    """(the collated training batches as an iterator, the first of them, None) or (None, None, why there are none)."""
    from .data import collated_chunks, is_map_style

    if table is not None:
        batches = table.chunks()
    else:
        batches = collated_chunks(dataset, collate) if is_map_style(dataset) else None
    if batches is None:
        return None, None, "the training set is iterable, so its batches cannot be looked at beforehand"
    first = next(batches, None)
    if first is None:
        return None, None, "the training set is empty"
    return batches, first, None


def skip_mask_lever(config, model, table, dataset, collate, varlen: Lever) -> Lever:
    """3b. SDPA's is_causal for plain causal rows: decided on the first collated training batch."""
    from . import causal_attention as ca

    wanted, required = _asked(config.skip_causal_mask, config.fast)
    if not wanted:
        return Lever(False, "skip_causal_mask false" if config.skip_causal_mask is False else "not asked for")
    if varlen.on:
        why = "varlen_attention serves these packed rows"
    else:
        _, first, why = _training_batches(table, dataset, collate)
        why = why or ca.why_not(model, first)
    if why and required:
        raise LoopError(f"skip_causal_mask cannot be used here: {why}; set skip_causal_mask false")
    return Lever(why is None, why or ("asked for" if required else "fast"))


def attention_backends(config, table) -> str | None:
    """4. The SDPA kernels: as asked, or under `fast` without cuDNN when batch widths vary (cuDNN builds an execution
    plan for every new shape: most of an SST-2 step's host time)."""
    if config.attention_backends is None and config.fast and widths_vary(table):
        return "flash,efficient,math"
    return config.attention_backends


def graph_lever(config, accelerator, optimizer, table, custom_step: bool, step_events: bool = False) -> Lever:
    """5. The recorded step: asked for (refused where it cannot record), or through `fast` only where it was verified
    on a GPU (batches cut from the device table)."""
    from . import graph_step as gs

    wanted, required = _asked(config.cuda_graph_step, config.fast)
    if not wanted:
        return Lever(False, "cuda_graph_step false" if config.cuda_graph_step is False else "not asked for")
    why = gs.why_not(config, accelerator, optimizer, table, custom_step, step_events)
    if why is not None and required:
        raise LoopError(why)
    if why is None and not required and table is None:
        why = "fast records the step only for batches cut from the device table (dataset_on_device)"
    return Lever(why is None, why or ("asked for" if required else "fast"))


def compile_lever(config, table, graph: Lever) -> tuple[Lever, bool]:
    """6. (compiled, dynamic shapes). With varying widths under `fast`, a recorded step is not compiled unless a compile
    mode or backend is named (compiling with dynamic shapes costs tens of seconds to save about a millisecond a step on
    a small model: it pays only over tens of thousands of steps), and a
    compiled model is compiled once with dynamic shapes (by default it compiles the first width statically, then
    everything again at the second)."""
    if not (config.torch_compile or config.fast):
        return Lever(False, "not asked for"), False
    why = "asked for" if config.torch_compile else "fast"
    if config.fast and widths_vary(table):
        if graph.on and config.torch_compile_mode is None and config.torch_compile_backend is None:
            return Lever(False, "batch widths vary and the step is recorded: the eager step is recorded instead"), False
        return Lever(True, why), True
    return Lever(True, why), False


def ddp_levers(config) -> tuple[bool | None, bool, bool | None]:
    """7. (find_unused_parameters, gradient_as_bucket_view, ddp_compile_overlap): under `fast` no unused-parameter
    search, gradients kept in DDP's buckets, and one compiled graph whose gradients are all-reduced after the backward,
    unless the fields say otherwise."""
    find_unused, overlap = config.ddp_find_unused_parameters, config.ddp_compile_overlap
    if config.fast:
        find_unused = False if find_unused is None else find_unused
        overlap = False if overlap is None else overlap
    return find_unused, bool(config.fast), overlap


def apply(plan: Plan, run) -> None:
    """Make the plan's changes, in its order, before prepare(): the model (fused head, attention implementation, the
    problem_type a compiled head would otherwise set in its first forward), the step, the Accelerator's compile and
    DDP settings. Everything done to the model is undone after the run (model_changes.ModelChanges)."""
    from . import causal_attention, fused_loss
    from . import varlen_attention as va
    from .run import topology

    acc = run.accelerator
    if plan.fused_linear_cross_entropy.on:
        fused_loss.enable(run.unwrapped, topology(acc))
    if plan.varlen_attention.on:
        va.enable(run.unwrapped, plan.varlen_segments)
    if plan.skip_causal_mask.on:
        causal_attention.enable(run.unwrapped)
    run.attention = plan.attention()
    run.evaluate_eagerly = plan.evaluate_eagerly
    if plan.cuda_graph_step.on:
        from .graph_step import GraphStep

        run.step_fn = GraphStep(run)
    _compile_settings(plan, run, acc)
    if acc.ddp_handler is not None:
        if plan.ddp_find_unused_parameters is not None:
            acc.ddp_handler.find_unused_parameters = plan.ddp_find_unused_parameters
        if plan.gradient_as_bucket_view:  # gradients live in DDP's buckets: one gradient-sized buffer less
            acc.ddp_handler.gradient_as_bucket_view = True


def _compile_settings(plan, run, acc):
    """accelerate's compile plugin as the plan says. And transformers' sequence-classification heads set
    config.problem_type at their first forward (from num_labels and the labels' dtype); under torch.compile that
    mutation fails a guard and the whole model is compiled a second time. It is set beforehand by the same rule from
    the device table's labels, so the first forward finds it set."""
    from accelerate.utils import DynamoBackend

    from .run import compile_plugin

    config = run.config
    if not plan.torch_compile.on:
        if config.torch_compile or plan.fast:  # asked for or through fast, and decided against: prepare() leaves it
            acc.state.dynamo_plugin.backend = DynamoBackend.NO
        return
    if not config.torch_compile:  # through `fast`: the Accelerator was made without a compile plugin
        acc.state.dynamo_plugin = compile_plugin(config)
    if plan.compile_dynamic:
        acc.state.dynamo_plugin.dynamic = True
    table = run.loader.device_table if run.loader is not None else None
    if table is None:
        return
    model_config, labels = getattr(run.unwrapped, "config", None), table.dtypes.get("labels")
    if (
        labels is not None
        and hasattr(model_config, "problem_type")
        and model_config.problem_type is None
        and type(run.unwrapped).__name__.endswith("ForSequenceClassification")
    ):
        model_config.problem_type = (
            "regression"
            if model_config.num_labels == 1
            else "single_label_classification"
            if labels in (torch.long, torch.int)
            else "multi_label_classification"
        )
