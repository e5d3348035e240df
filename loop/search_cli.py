"""`loop search --config JOB --hp_space SPACE.yaml --n_trials N [--storage URL --study_name NAME] [--field value ...]`:
a hyperparameter search over a job (loop/search.py), each trial a `loop train` of the job with the trial's values, in
`<output_dir>/run-<trial number>`. The trials' table (`trials.csv`) and the best run (`best_run.json`) are written to
the job's output_dir after every trial.

SPACE.yaml maps job fields (TrainConfig's or the task's) to ranges:

    learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # floats: suggest_float (log, step)
    warmup_steps: {low: 0, high: 20}                        # ints: suggest_int (log, step)
    per_device_train_batch_size: {choices: [8, 16]}         # suggest_categorical

With `--storage` (an Optuna RDB URL: sqlite:///study.db here, PostgreSQL or MySQL in production) and `--study_name`,
processes anywhere share one study: `--n_trials` counts the study's finished trials, whichever process ran them.
Each process keeps a heartbeat in the storage; a trial whose process was killed is marked failed once its heartbeat
is `--grace_period` seconds old, and is run again with the same values by the next process to start a trial, from the
killed run's newest whole checkpoint when it has one.
"""

from __future__ import annotations

import csv
import json
import os
import socket

from .errors import LoopError

OPTIONS = {  # search options: everything else on the command line is the job's
    "hp_space": None,
    "n_trials": "20",
    "direction": "minimize",
    "metric": None,
    "storage": None,
    "study_name": None,
    "sampler_seed": None,
    "pruner": "median",
    "heartbeat_interval": "60",
    "grace_period": "120",
}


def parse(argv):
    """(search options, the job's argv)."""
    from .job import parse_overrides

    given = parse_overrides(argv)
    options = {k: given.pop(k, default) for k, default in OPTIONS.items()}
    if not options["hp_space"]:
        raise LoopError("loop search needs --hp_space SPACE.yaml (job fields mapped to ranges; docs/search.md)")
    if options["direction"] not in ("minimize", "maximize"):
        raise LoopError(f"--direction {options['direction']!r}: use minimize or maximize")
    if options["pruner"] not in ("median", "none"):
        raise LoopError(f"--pruner {options['pruner']!r}: use median (Optuna's default) or none")
    if bool(options["storage"]) != bool(options["study_name"]):
        raise LoopError("--storage and --study_name go together: processes find their shared study by both")
    for name in ("n_trials", "sampler_seed", "heartbeat_interval", "grace_period"):
        if options[name] is not None:
            try:
                options[name] = int(options[name])
            except ValueError:
                raise LoopError(f"--{name} {options[name]!r}: give a whole number") from None
    job = [x for k, v in given.items() for x in (f"--{k}", str(v))]
    return options, job


def load_space(path: str) -> dict:
    """SPACE.yaml as {field: spec}, each spec checked here (one line naming the field and the fix)."""
    from .job import load_yaml

    space = load_yaml(path)
    if not space:
        raise LoopError(f"{path} names no field to search; map fields to {{low, high}} or {{choices}}")
    for name, spec in space.items():
        if not isinstance(spec, dict) or not (("low" in spec and "high" in spec) or "choices" in spec):
            raise LoopError(
                f"{path}: {name} needs {{low: .., high: ..}} (with log or step) or {{choices: [..]}}, got {spec!r}"
            )
        extra = set(spec) - {"low", "high", "log", "step", "choices"}
        if extra:
            raise LoopError(f"{path}: {name} has unknown keys {sorted(extra)}; use low, high, log, step or choices")
    return space


def suggest(trial, space: dict) -> dict:
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif all(
            isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")
        ) and not isinstance(spec.get("step", 1), float):
            values[name] = trial.suggest_int(
                name, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False)
            )
        else:
            values[name] = trial.suggest_float(
                name, float(spec["low"]), float(spec["high"]), step=spec.get("step"), log=spec.get("log", False)
            )
    return values


def cmd_search(argv) -> int:
    from .job import job_from_values, job_values
    from .search import check_backend

    options, job_argv = parse(argv)
    check_backend("optuna")
    space = load_space(options["hp_space"])
    values = job_values(job_argv)
    config, module, task = job_from_values(values)  # the job checked once, before any trial
    unknown = [k for k in space if k not in _job_fields(module)]
    if unknown:
        raise LoopError(
            f"{options['hp_space']}: {unknown[0]} is not a field of the job; `loop train --help` lists them"
        )
    base = config.output_dir
    if not options["storage"] and os.path.isfile(os.path.join(base, "trials.csv")):
        raise LoopError(
            f"{base} holds another search (trials.csv); choose another --output_dir, or share a study with "
            "--storage URL --study_name NAME"
        )
    best = _optimize(options, values, space, base, config.use_cpu)
    if best is not None:
        print(f"best trial {best.run_id}: objective {best.objective} with {best.hyperparameters}")
        print(f"trials: {os.path.join(base, 'trials.csv')}, best run: {os.path.join(base, 'best_run.json')}")
    return 0


def _job_fields(module) -> set:
    import dataclasses

    from .config import TrainConfig
    from .job import task_fields

    return {f.name for f in dataclasses.fields(TrainConfig)} | set(task_fields(module))


def _optimize(options, values, space, base, cpu):
    import optuna

    from .search import optimize

    study_kwargs = {}
    if options["storage"]:
        from optuna.storages import RDBStorage, RetryFailedTrialCallback

        study_kwargs = dict(
            storage=RDBStorage(
                options["storage"],
                heartbeat_interval=options["heartbeat_interval"],
                grace_period=options["grace_period"],
                failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
            ),
            study_name=options["study_name"],
            load_if_exists=True,
        )
    if options["sampler_seed"] is not None:
        seed = options["sampler_seed"]
        if options["storage"]:  # the same seed in every process would have each suggest the same values
            seed = hash((seed, socket.gethostname(), os.getpid())) % 2**32
        study_kwargs["sampler"] = optuna.samplers.TPESampler(seed=seed)
    study_kwargs["pruner"] = (
        optuna.pruners.NopPruner() if options["pruner"] == "none" else optuna.pruners.MedianPruner()
    )
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    callbacks = [lambda study, trial: write_tables(study, base, options["direction"])]
    if options["storage"]:  # the study's count, shared by every process working on it
        callbacks.insert(0, optuna.study.MaxTrialsCallback(options["n_trials"], states=finished))
    os.makedirs(base, exist_ok=True)
    return optimize(
        lambda trial: run_trial(trial, values, space, base, options["metric"]),
        lambda trial: suggest(trial, space),
        options["n_trials"],
        options["direction"],
        study_kwargs,
        {},
        callbacks,
        cpu=cpu,
    )


def run_trial(trial, values, space, base, metric):
    """One trial: the job with the trial's values, in run-<number> (a retried trial continues the killed run's newest
    whole checkpoint, in its folder)."""
    from transformers.trainer_utils import default_compute_objective

    from . import checkpoint as ckpt
    from .fit import train
    from .job import build_task, job_from_values
    from .search import Report

    params = suggest(trial, space)
    out, resume = os.path.join(base, f"run-{trial.number}"), None
    retried = _retried_number(trial)
    if retried is not None:
        killed = os.path.join(base, f"run-{retried}")
        if ckpt.list_checkpoints(killed):
            out, resume = killed, "latest"
    config, module, task = job_from_values({**values, **params, "output_dir": out})
    report = Report(trial, _metric(metric) if metric else default_compute_objective)
    trial.set_user_attr("output_dir", out)
    trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it (trials.csv)
    built = build_task(module, task, config)
    built["callbacks"] = [*built.get("callbacks", []), report]
    train(config, resume_from_checkpoint=resume, **built)
    if report.objective is None:
        # no evaluation inside the run (none asked for, or a retried trial whose killed run had already saved its last
        # step, so nothing was left to train): the final model evaluated once, Trainer's rule (run_hp_search_optuna)
        return report.compute_objective(_final_evaluation(config, built))
    return report.objective


def _final_evaluation(config, built) -> dict:
    from .job import evaluate_built

    if built.get("eval_dataset") is None or built.get("model") is None:
        raise LoopError(
            "the trial ended without an evaluation to score it and its task gives no validation set (or no model) "
            "to evaluate afterwards; give the task a validation split"
        )
    return evaluate_built(config, built["model"], built)


def _metric(metric):
    """The objective: one evaluation metric by name (`eval_` added, as for metric_for_best_model)."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"

    def objective(metrics):
        if key not in metrics:
            raise LoopError(f"--metric {metric}: the evaluation gives {', '.join(sorted(metrics))}; name one of those")
        return metrics[key]

    return objective


def _retried_number(trial):
    """The number of the killed trial this one runs again, or None (a FixedTrial of the other ranks: None)."""
    storage = getattr(trial, "storage", None)
    if storage is None:
        return None
    return _retry_of(storage.get_trial(trial._trial_id))


def _retry_of(frozen):
    from optuna.storages import RetryFailedTrialCallback

    return RetryFailedTrialCallback.retried_trial_number(frozen)


def write_tables(study, base, direction):
    """trials.csv (every trial: number, state, objective, values, folder) and best_run.json, each written whole and
    renamed into place, so that processes sharing the study never leave a half table."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    tmp = os.path.join(base, f".trials-{os.getpid()}.csv")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "objective", *names, "output_dir", "process", "retry_of"])
        for t in trials:
            row = [t.number, t.state.name, t.value, *[t.params.get(n) for n in names]]
            w.writerow([*row, t.user_attrs.get("output_dir"), t.user_attrs.get("process"), _retry_of(t)])
    os.replace(tmp, os.path.join(base, "trials.csv"))
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        best = (min if direction == "minimize" else max)(done, key=lambda t: t.value)
        tmp = os.path.join(base, f".best_run-{os.getpid()}.json")
        with open(tmp, "w") as f:
            json.dump(
                {
                    "run_id": str(best.number),
                    "objective": best.value,
                    "hyperparameters": best.params,
                    "output_dir": best.user_attrs.get("output_dir"),
                },
                f,
                indent=1,
            )
        os.replace(tmp, os.path.join(base, "best_run.json"))
