"""`loop.Trainer.hyperparameter_search` (loop/search.py) against transformers.Trainer's, with Optuna and a seeded
sampler: the same trials (values, reports at every evaluation, pruned or not, objective) and the same best run."""

import optuna
import pytest
import transformers
from helpers import LMData, tiny_gpt2
from transformers import TrainingArguments

import loop
from loop.errors import LoopError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
        learning_rate=1e-3,
    )
    return TrainingArguments(**{**base, **kw})


def model_init(trial):  # Trainer calls it with the trial before hp_space sets the trial's values
    return tiny_gpt2(dropout=0.1)


def space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
        "gradient_accumulation_steps": trial.suggest_categorical("gradient_accumulation_steps", [1, 2]),
        "warmup_steps": trial.suggest_int("warmup_steps", 0, 3),
    }


def _search(Base, tmp_path, hp_space, n_trials, **kw):
    name = Base.__module__
    trainer = Base(
        model_init=model_init, args=_args(tmp_path / name), train_dataset=LMData(40), eval_dataset=LMData(9, seed=1)
    )
    storage = f"sqlite:///{tmp_path / name}.db"
    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        n_trials=n_trials,
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=0),
        storage=storage,
        study_name="s",
        **kw,
    )
    trials = optuna.load_study(study_name="s", storage=storage).trials
    return trainer, best, [(t.state, t.params, t.value, t.intermediate_values) for t in trials]


def test_search_gives_trainers_trials_and_best_run_pruning_included(tmp_path):
    pruner = dict(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2))
    _, their_best, theirs = _search(transformers.Trainer, tmp_path, space, 6, **pruner)
    ours_trainer, our_best, ours = _search(loop.Trainer, tmp_path, space, 6, **pruner)
    assert ours == theirs
    assert our_best == their_best
    states = [s for s, *_ in ours]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1 and states.count(optuna.trial.TrialState.COMPLETE) >= 2
    assert all(len(reports) >= 1 for *_, reports in ours)  # reported at every evaluation
    # the trials wrote what Trainer's wrote (here, with save_strategy no: nothing, not even their run-<n> folders);
    # the arguments given are the caller's again
    written = {
        m: sorted(str(p.relative_to(tmp_path / m)) for p in (tmp_path / m).rglob("*"))
        for m in ("loop.trainer", "transformers.trainer")
    }
    assert written["loop.trainer"] == written["transformers.trainer"]
    assert ours_trainer.args.learning_rate == 1e-3 and ours_trainer.args.gradient_accumulation_steps == 1
    assert ours_trainer.state.trial_params is not None and ours_trainer.state.is_hyper_param_search


def test_default_space_and_objective_are_trainers(tmp_path):
    """default_hp_space_optuna sets the seed and the batch size too; the seed a trial's model is made with is the
    previous trial's (Trainer's order), which the loop keeps."""
    _, their_best, theirs = _search(transformers.Trainer, tmp_path, None, 3)
    _, our_best, ours = _search(loop.Trainer, tmp_path, None, 3)
    assert ours == theirs and our_best == their_best


def test_what_the_search_cannot_run_is_refused_in_one_line(tmp_path):
    trainer = loop.Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=LMData(8))
    with pytest.raises(LoopError, match="needs a model_init"):
        trainer.hyperparameter_search(n_trials=1)
    trainer = loop.Trainer(model_init=model_init, args=_args(tmp_path), train_dataset=LMData(8), eval_dataset=LMData(4))
    with pytest.raises(LoopError, match="backend='ray' needs Ray Tune, which is not installed"):
        trainer.hyperparameter_search(backend="ray", n_trials=1)
    with pytest.raises(LoopError, match="n_jobs=2"):
        trainer.hyperparameter_search(n_trials=1, n_jobs=2)
    with pytest.raises(LoopError, match="'learning_rte', which is not a field of TrainingArguments"):
        trainer.hyperparameter_search(
            hp_space=lambda t: {"learning_rte": t.suggest_float("lr", 1e-4, 1e-3)}, n_trials=1
        )
