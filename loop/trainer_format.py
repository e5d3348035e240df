"""Trainer's checkpoint files, both ways: what `transformers.Trainer` reads and writes, inside the loop's checkpoint.

Every `checkpoint-<step>/` the loop writes also holds Trainer's own files, so that Trainer resumes from it as from its
own (checkpoint.PARTS writes them):

  * model.safetensors (and config.json for a transformers model), optimizer.pt, scheduler.pt, scaler.pt: the names
    the loop's parts already use, in the formats Trainer's `torch.load(weights_only=True)` reads;
  * rng_state.pth (one process) or rng_state_<rank>.pth (several): Trainer's keys (python, numpy, cpu, cuda), plus
    the loop's own (the loss accumulated since the last log record, the random streams at the epoch's start);
  * trainer_state.json: a `TrainerState` made from the loop's state (step, epoch, log history, best metric, stateful
    callbacks with the TrainerControl), written here;
  * training_args.bin: the `TrainingArguments` the run was made with (loop.Trainer's) or its TrainConfig turned into
    them (training_arguments.to_training_arguments); Trainer writes it for the record and reads nothing from it.

The loop resumes from a checkpoint Trainer wrote (no `COMPLETE` marker, no loop_state.json, but trainer_state.json):
the weights, optimizer, scheduler, scaler and random streams load through the same parts; the progress comes from
trainer_state.json (read_trainer_state). What such a checkpoint lacks, the loop does as Trainer does when it resumes
its own: the loss accumulated since the last log record is not saved, so the first record after the resume averages
the steps since the resume and the final train_loss counts this call's steps; the random streams at the epoch's start
are not saved, so the resumed epoch's loader starts under the current streams. Trainer writes trainer_state.json last
and has no manifest: a Trainer checkpoint counts as whole when that file reads and its weights and optimizer exist.
"""

from __future__ import annotations

import json
import os

TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"


# ---------------------------------------------------------------------------------------------- the loop writes
def rng_file_name(acc) -> str:
    """Trainer's name for this process's random streams: rng_state.pth alone, rng_state_<rank>.pth among several."""
    return "rng_state.pth" if acc.num_processes <= 1 else f"rng_state_{acc.process_index}.pth"


def trainer_state(run):
    """The run's progress as a transformers TrainerState (what Trainer keeps, and what its callbacks read)."""
    from transformers.trainer_callback import TrainerState

    from .trainer_callbacks import TrainerCallbacks

    t, acc, config = run.state, run.accelerator, run.config
    adapter = next((cb for cb in run.callbacks if isinstance(cb, TrainerCallbacks)), None)
    s = TrainerState(
        epoch=t.epoch,
        global_step=t.global_step,
        max_steps=t.max_steps,
        train_batch_size=config.per_device_train_batch_size,  # Trainer's args.train_batch_size (no DataParallel)
        num_train_epochs=run.plan.num_epochs,
        num_input_tokens_seen=t.num_input_tokens_seen,
        total_flos=t.total_flos,
        log_history=list(t.log_history),
        best_metric=t.best_metric,
        best_global_step=t.best_global_step,
        best_model_checkpoint=t.best_checkpoint,
        is_local_process_zero=acc.is_local_main_process,
        is_world_process_zero=acc.is_main_process,
        stateful_callbacks=adapter.state_dict() if adapter is not None else {"TrainerControl": run.control.state()},
    )
    set_steps(s, run.plan)
    if getattr(run, "trial_params", None) is not None:  # a hyperparameter_search trial (loop.search)
        s.is_hyper_param_search, s.trial_params = True, dict(run.trial_params)
    return s


def set_steps(s, plan):
    """logging/eval/save steps made absolute (integers), as Trainer's compute_steps stores them; an unset one keeps
    TrainerState's default, as in Trainer."""
    for kind, every in (("logging", plan.log_every), ("eval", plan.eval_every), ("save", plan.save_every)):
        if every is not None:
            setattr(s, f"{kind}_steps", every)


def training_arguments(run):
    """The TrainingArguments to pickle into training_args.bin: the ones a loop.Trainer was given, else the run's
    TrainConfig as TrainingArguments (made once a run). None when they cannot be made (then the file is left out)."""
    args = getattr(run, "training_args", None)
    if args is None:
        from .training_arguments import to_training_arguments

        try:  # use_configured_state: made inside the run, they take its accelerate state instead of resetting it
            keep = {**(run.config.accelerator_config or {}), "use_configured_state": True}  # the run's state stays
            args = to_training_arguments(run.config, accelerator_config=keep)
        except Exception:  # a setting TrainingArguments validates differently: the record is not worth failing a save
            args = False
        run.training_args = args
    return args or None


def write(run, folder: str):
    """trainer_state.json, training_args.bin and the model's config.json (writing process only)."""
    import torch

    trainer_state(run).save_to_json(os.path.join(folder, TRAINER_STATE))
    args = training_arguments(run)
    if args is not None:
        torch.save(args, os.path.join(folder, TRAINING_ARGS))
    config = getattr(run.unwrapped, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(os.path.join(folder, "config.json"))


# ---------------------------------------------------------------------------------------------- the loop reads
def is_trainer_checkpoint(path: str) -> bool:
    """A folder Trainer wrote: its trainer_state.json, without the loop's own state and marker."""
    return (
        os.path.isfile(os.path.join(path, TRAINER_STATE))
        and not os.path.isfile(os.path.join(path, "loop_state.json"))
        and not os.path.isfile(os.path.join(path, "COMPLETE"))
    )


def problem(path: str):
    """What keeps a Trainer checkpoint from being resumed (one phrase), or None."""
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            json.load(f)
    except (OSError, ValueError):
        return f"its {TRAINER_STATE} is unreadable"
    from .checkpoint import weight_files

    if weight_files(path) is None:
        return "a Trainer checkpoint without whole weights (model.safetensors, its shards, or pytorch_model.bin)"
    return None


def read_trainer_state(path: str, run=None):
    """A Trainer checkpoint's progress as the loop's TrainState. With the run: the data position Trainer computes on
    resume (whole epochs done, then the micro-batches of the current one), and the loss counted from here on."""
    from .state import TrainState

    with open(os.path.join(path, TRAINER_STATE)) as f:
        saved = json.load(f)
    step = int(saved.get("global_step", 0))
    best = saved.get("best_model_checkpoint")
    state = TrainState(
        global_step=step,
        epoch=float(saved.get("epoch") or 0.0),
        max_steps=int(saved.get("max_steps") or 0),
        num_input_tokens_seen=int(saved.get("num_input_tokens_seen") or 0),
        total_flos=float(saved.get("total_flos") or 0.0),
        best_metric=saved.get("best_metric"),
        best_global_step=saved.get("best_global_step"),
        best_checkpoint=best if best and os.path.isdir(best) else None,
        last_logged_step=step,  # Trainer saves no running loss: the next record averages the steps from here
        loss_counted_from=step,  # and the final train_loss counts this call's steps (Trainer's rule on resume)
        log_history=list(saved.get("log_history") or []),
        callback_states={"TrainerCallbacks": saved.get("stateful_callbacks") or {}},
        geometry=_geometry(path, saved),
    )
    if run is not None:
        per_epoch = run.plan.updates_per_epoch
        state.epoch_index = step // per_epoch
        state.batches_in_epoch = (step % per_epoch) * run.config.gradient_accumulation_steps
    return state


def _geometry(path: str, saved: dict) -> dict:
    """What a Trainer checkpoint says of the data position's meaning: its batch size, its accumulation (from
    training_args.bin, when it reads) and its number of processes (its RNG files). The dataset length is not saved."""
    geometry = {}
    if saved.get("train_batch_size") is not None:
        geometry["per_device_train_batch_size"] = saved["train_batch_size"]
    try:
        import torch

        args = torch.load(os.path.join(path, TRAINING_ARGS), weights_only=False)
        geometry["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
    except Exception:  # absent, or pickled by another transformers: the accumulation is then taken on trust
        pass
    ranks = [n for n in os.listdir(path) if n.startswith("rng_state_") and n.endswith(".pth")]
    if ranks or os.path.isfile(os.path.join(path, "rng_state.pth")):
        geometry["world_size"] = max(len(ranks), 1)
    return geometry
