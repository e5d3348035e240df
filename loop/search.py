"""Hyperparameter search with Trainer.hyperparameter_search's meaning, on the loop; Optuna is the backend (the
`search` extra: `pip install -e ".[search]"`).

A trial is one run of the loop: the trial's values set on the arguments (Trainer's rule: each value cast to the type
of the field it replaces), a fresh model from `model_init(trial)`, the run in `<output_dir>/run-<trial number>` (or
`hp_name(trial)`), and the objective (`compute_objective(metrics)`, by default Trainer's: the eval loss, or the sum
of the other metrics) reported to Optuna at every evaluation, so that its pruner can stop the trial there. A run
with no evaluation is evaluated once at its end, as Trainer does.

Under several processes (`accelerate launch`, torchrun) every trial runs on all of them: the first process drives the
study and hands each trial's values to the others; a pruning decision is the first process's, shared at the
evaluation where it is taken (a host-side broadcast at an evaluation boundary, never per step).

`optimize()` serves `loop.Trainer.hyperparameter_search` and `loop search` (the command line, search_cli.py).
"""

from __future__ import annotations

import importlib.util
import warnings

from .callbacks import Callback, fire
from .errors import LoopError


# ---------------------------------------------------------------------------------------------- the backend
def check_backend(backend) -> str:
    """Trainer's choice of backend (Optuna if installed, else Ray), refused in one line where the loop cannot run it."""
    name = getattr(backend, "value", backend)
    if name is None:
        name = "optuna" if _installed("optuna") else "ray" if _installed("ray") else None
        if name is None:
            raise LoopError("hyperparameter_search needs Optuna: pip install -e '.[search]' (or pip install optuna)")
    name = str(name)
    if name == "optuna":
        if not _installed("optuna"):
            raise LoopError(
                "backend='optuna' needs the optuna package: pip install -e '.[search]' (or pip install optuna)"
            )
        return name
    if name == "ray":
        if not _installed("ray"):
            raise LoopError(
                "backend='ray' needs Ray Tune, which is not installed: pip install 'ray[tune]', or use backend='optuna'"
            )
        raise LoopError("backend='ray': the loop runs its trials through Optuna only; use backend='optuna'")
    raise LoopError(f"backend={name!r} is not one the loop runs; use backend='optuna'")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- a trial's values
def set_params(args, params: dict, where: str = "TrainingArguments"):
    """Trainer's _hp_search_setup on `args` (in place): each value cast to the type of the value it replaces. A name
    with no field is refused in one line (Trainer warns and goes on, which hides a typo for the whole search)."""
    for key, value in params.items():
        if not hasattr(args, key):
            raise LoopError(
                f"the search space sets {key!r}, which is not a field of {where}; name a field (loop fields lists them)"
            )
        old = getattr(args, key)
        if old is not None:
            value = type(old)(value)
        setattr(args, key, value)
    return args


def trial_params(trial) -> dict:
    """What TrainerState.trial_params holds: an Optuna trial's values, or the dict given as the trial."""
    if trial is None:
        return None
    return dict(trial.params) if hasattr(trial, "params") else dict(trial)


# ---------------------------------------------------------------------------------------------- reporting
class Report(Callback):
    """The objective at each evaluation, reported to the trial so that the pruner can stop the run there."""

    def __init__(self, trial, compute_objective):
        self.trial, self.compute_objective = trial, compute_objective
        self.objective = None

    def on_evaluate(self, run, metrics):
        self.objective = self.compute_objective(dict(metrics))
        if isinstance(self.objective, (list, tuple)) or not hasattr(self.trial, "should_prune"):
            return  # several objectives: Optuna cannot prune them (Trainer does not report them either)
        acc = run.accelerator
        prune = False
        if acc.is_main_process:
            self.trial.report(self.objective, run.state.global_step)
            prune = bool(self.trial.should_prune())
        if acc.num_processes > 1:  # one decision for every rank: a host-side broadcast, at an evaluation only
            from accelerate.utils import broadcast_object_list

            prune = broadcast_object_list([prune])[0]
        if prune:  # on every rank (a search runs only where Optuna is installed: check_backend)
            import optuna

            fire(run.callbacks, "on_train_end", run)  # as Trainer calls on_train_end before raising
            raise optuna.TrialPruned()


# ---------------------------------------------------------------------------------------------- the study
def optimize(
    run_trial, hp_space, n_trials: int, direction, study_kwargs: dict, optimize_kwargs: dict, callbacks=(), cpu=False
):
    """Run the study: `run_trial(trial)` -> the trial's objective, on every process (it calls hp_space(trial) where
    Trainer does). Returns transformers' BestRun (a list of them for several directions) on the first process, None
    on the others. `cpu`: the runs' use_cpu (accelerate's process state is made here, before the first run's, and
    must agree with it: on a CPU-only launch of several processes it counts them only with cpu=True)."""
    import optuna
    from accelerate import PartialState
    from transformers.trainer_utils import BestRun

    n_jobs = optimize_kwargs.pop("n_jobs", 1)
    if n_jobs != 1:
        raise LoopError(
            f"n_jobs={n_jobs}: trials in threads of one process would share its random state and its arguments; "
            "run several processes on one storage instead (loop search --storage ...)"
        )
    state = PartialState(cpu=cpu)
    if not state.is_main_process:  # the other ranks run the trials the first one hands them, until it says done
        while (got := _broadcast(None)) is not None:
            params, number = got
            trial = optuna.trial.FixedTrial(params, number)
            try:
                run_trial(trial)
            except optuna.TrialPruned:
                pass
        return None

    def objective(trial):
        if state.num_processes > 1:  # the values first, to hand them to the other ranks (Trainer's order there)
            hp_space(trial)
            _broadcast((dict(trial.params), trial.number))
        return run_trial(trial)

    directions = direction if isinstance(direction, (list, tuple)) else None
    study = optuna.create_study(
        direction=None if directions else direction, directions=list(directions) if directions else None, **study_kwargs
    )
    try:
        while not _optimized(study, objective, n_trials, callbacks, optimize_kwargs):
            pass
    finally:
        if state.num_processes > 1:
            _broadcast(None)  # the other ranks stop waiting for trials
    if not study._is_multi_objective():
        best = study.best_trial
        return BestRun(str(best.number), best.value, best.params)
    return [BestRun(str(t.number), t.values, t.params) for t in study.best_trials]


def _optimized(study, objective, n_trials, callbacks, optimize_kwargs) -> bool:
    """study.optimize; False when it must go on. On a storage shared by processes (heartbeats), a process that is
    alive but slow can be judged dead by another: that one marks the trial failed and runs it again (from this run's
    checkpoints), and Optuna then refuses this process's result with "Cannot tell a FAIL trial". The search goes on
    here until the study holds n_trials finished trials, instead of this process stopping with a traceback."""
    import optuna

    try:
        study.optimize(objective, n_trials=n_trials, callbacks=list(callbacks), **optimize_kwargs)
        return True
    except (ValueError, AssertionError) as e:  # Optuna's _run_trial turns the ValueError into an AssertionError
        if not any(str(x).startswith("Cannot tell a FAIL trial") for x in (e, e.__context__)):
            raise
    warnings.warn(
        "a trial of this process was marked failed by another process sharing the study (its heartbeat looked older "
        "than the grace period) and runs again there; this process goes on with the next trial"
    )
    finished = study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    return len(finished) >= n_trials


def _broadcast(value):
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
