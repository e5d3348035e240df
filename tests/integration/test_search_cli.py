"""`loop search` (loop/search_cli.py): the docs' command as written, and processes sharing one SQLite study, one of
them killed in the middle of a trial: its trial runs again, from its newest checkpoint, and no trial is lost."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import ENV, ROOT, doc_block, run_loop

pytestmark = pytest.mark.slow

SMALL = [
    "--max_steps",
    "30",
    "--eval_steps",
    "10",
    "--save_steps",
    "10",
    "--max_docs",
    "60",
    "--max_eval_samples",
    "16",
]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_docs_search_command_runs_as_written(tmp_path):
    argv = shlex.split(doc_block("loop search --hp_space"))[1:]
    argv = [a.replace("docs/examples/", os.path.join(ROOT, "docs", "examples") + "/") for a in argv]
    argv = [str(tmp_path / a) if a.startswith("outputs/") else a for a in argv]
    proc = run_loop(*argv, "--disable_tqdm", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "search"
    rows = _rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    best = json.loads((out / "best_run.json").read_text())
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert float(best["objective"]) == min(float(r["objective"]) for r in done)
    assert (out / f"run-{best['run_id']}" / "model.safetensors").exists()
    assert f"best trial {best['run_id']}" in proc.stdout
    # the same command again: the folder holds a search, refused in one line
    again = run_loop(*argv)
    assert again.returncode == 2 and "holds another search (trials.csv)" in again.stderr


def test_a_search_under_two_processes_runs_every_trial_on_both(tmp_path):
    """docs/search.md's torchrun command as written (2 CPU processes): the first process drives the study and hands
    each trial's values to the other, so every trial's run holds both ranks' RNG files; the values are those of the
    same search in one process (the same seeded sampler)."""
    argv = shlex.split(doc_block("torchrun --nproc_per_node 2 -m loop search"))[5:]
    argv = [a.replace("docs/examples/", os.path.join(ROOT, "docs", "examples") + "/") for a in argv]
    argv = [str(tmp_path / a) if a.startswith("outputs/") else a for a in argv]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581"]
    proc = subprocess.run([*launch, "-m", "loop", *argv], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _rows(tmp_path / "outputs" / "search-2proc" / "trials.csv")
    assert [r["state"] for r in two] == ["COMPLETE", "COMPLETE"]
    for r in two:
        saved = os.listdir(tmp_path / "outputs" / "search-2proc" / f"run-{r['number']}" / "checkpoint-6")
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(saved), saved
    one_argv = [a.replace("search-2proc", "search-1proc") for a in argv]
    assert run_loop(*one_argv).returncode == 0
    one = _rows(tmp_path / "outputs" / "search-1proc" / "trials.csv")
    keys = ("learning_rate", "warmup_steps", "weight_decay")
    assert [[r[k] for k in keys] for r in two] == [[r[k] for k in keys] for r in one]


def test_processes_share_one_study_and_a_killed_trial_runs_again_from_its_checkpoint(tmp_path):
    shared = shlex.split(doc_block("loop search --hp_space docs/examples/search_space.yaml --n_trials 6 --storage"))
    storage = f"sqlite:///{tmp_path}/study.db"
    argv = [
        {"sqlite:///outputs/study.db": storage, "outputs/shared": str(tmp_path / "shared"), "6": "2"}.get(a, a)
        for a in shared[1:]
    ]
    # a grace period well above a busy 2-core machine's pauses: a live process judged dead makes a second rerun
    argv += ["--heartbeat_interval", "1", "--grace_period", "6", "--pruner", "none", *SMALL, "--disable_tqdm", "true"]
    cmd = [sys.executable, "-m", "loop", *argv]

    def start():
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first, t0 = start(), time.time()
    while not (tmp_path / "shared" / "run-0" / "checkpoint-10").is_dir():  # in the middle of trial 0, saved once
        assert first.poll() is None and time.time() - t0 < 300, first.stdout.read()[-3000:] if first.stdout else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(7)  # the killed process's heartbeat is older than the grace period
    others = [start(), start()]
    logs = [p.communicate(timeout=600)[0] for p in others]
    assert [p.returncode for p in others] == [0, 0], [log[-2000:] for log in logs]

    study = optuna.load_study(study_name="demo", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states[0] == optuna.trial.TrialState.FAIL
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 2 <= len(done) <= 3  # the count is the study's; a process already in a trial finishes it
    retry = [t for t in done if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == study.trials[0].params  # trial 0 ran again, once, with its values
    assert retry[0].user_attrs["output_dir"] == str(tmp_path / "shared" / "run-0")  # in its folder, resumed:
    records = [json.loads(line) for line in open(tmp_path / "shared" / "run-0" / "metrics.jsonl")]
    assert any(r.get("event") == "resumed" and r["step"] == 10 for r in records)
    assert (tmp_path / "shared" / "run-0" / "model.safetensors").exists()
    assert len({t.user_attrs["process"] for t in done}) == 2  # both surviving processes ran trials
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)  # no values run twice
    rows = _rows(tmp_path / "shared" / "trials.csv")
    assert [r["state"] for r in rows][0] == "FAIL" and any(r["retry_of"] == "0" for r in rows)


def _search(out, *args):
    space = os.path.join(ROOT, "docs", "examples", "search_space.yaml")
    small = ["--max_steps", "6", "--save_steps", "3", "--max_docs", "60", "--max_eval_samples", "16"]
    return run_loop("search", "--hp_space", space, *small, "--disable_tqdm", "true", "--output_dir", str(out), *args)


def test_a_trial_without_evaluations_is_scored_by_one_evaluation_of_its_final_model(tmp_path):
    """Trainer's rule (run_hp_search_optuna): a run that held no evaluation is evaluated once at its end, and that
    is the trial's objective: here the same number `loop evaluate` gives for the run's saved model."""
    from transformers.trainer_utils import default_compute_objective

    out = tmp_path / "search"
    proc = _search(out, "--n_trials", "1", "--sampler_seed", "0", "--eval_strategy", "no", "--eval_on_start", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = _rows(out / "trials.csv")
    records = [json.loads(line) for line in open(out / "run-0" / "metrics.jsonl")]
    assert row["state"] == "COMPLETE" and not any("eval_loss" in r for r in records)  # none inside the run
    small = ["--max_docs", "60", "--max_eval_samples", "16", "--disable_tqdm", "true"]
    ev = run_loop("evaluate", "--model_name_or_path", str(out / "run-0"), *small, "--output_dir", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    metrics.pop("model")  # the folder evaluated
    assert float(row["objective"]) == default_compute_objective(metrics)


def test_a_rerun_of_a_trial_whose_run_had_saved_its_last_step_is_scored_not_refused(tmp_path):
    """A killed trial's process may die after its run saved the last step (or be judged dead while it finishes):
    the rerun resumes that checkpoint, has nothing left to train, and is scored by evaluating the final model, which
    gives the objective of the run's own last evaluation (it was refused before)."""
    out, storage = tmp_path / "shared", f"sqlite:///{tmp_path}/study.db"
    shared = ["--storage", storage, "--study_name", "s", "--pruner", "none", "--eval_steps", "3"]
    assert _search(out, "--n_trials", "1", *shared).returncode == 0
    study = optuna.load_study(study_name="s", storage=storage)
    [first] = study.trials
    # what RetryFailedTrialCallback makes of a failed trial 0: a waiting copy with its values, marked as its rerun
    study.enqueue_trial(first.params)
    storage_ = study._storage
    rerun = study.trials[-1]
    storage_.set_trial_system_attr(rerun._trial_id, "failed_trial", 0)
    storage_.set_trial_system_attr(rerun._trial_id, "retry_history", [0])
    proc = _search(out, "--n_trials", "2", *shared)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert again.state == optuna.trial.TrialState.COMPLETE and again.user_attrs["output_dir"] == str(out / "run-0")
    records = [json.loads(line) for line in open(out / "run-0" / "metrics.jsonl")]
    assert any(r.get("event") == "resumed" and r["step"] == 6 for r in records)  # from the last step: nothing to train
    assert again.value == first.value


def test_a_process_whose_trial_another_marked_failed_goes_on_with_the_study(tmp_path):
    """A process judged dead by another (its heartbeat late, e.g. a long pause) sees its trial marked failed and run
    again elsewhere; Optuna then refuses its result ("Cannot tell a FAIL trial"). The process goes on with the next
    trial until the study holds n_trials finished ones, with one warning, instead of stopping with a traceback."""
    from loop.search import optimize

    storage = f"sqlite:///{tmp_path}/study.db"
    ran = []

    def space(trial):
        return {"x": trial.suggest_float("x", 0, 1)}

    def run_trial(trial):
        x = space(trial)["x"]  # run_trial calls hp_space itself, as Trainer's trials do
        ran.append(trial.number)
        if trial.number == 0:  # what another process's fail_stale_trials does to this trial while it runs
            trial.study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return x

    study_kwargs = dict(storage=storage, study_name="s", load_if_exists=True)
    with pytest.warns(UserWarning, match="marked failed by another process"):
        best = optimize(
            run_trial, lambda t: {"x": t.suggest_float("x", 0, 1)}, 2, "minimize", study_kwargs, {}, cpu=True
        )
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert ran == [0, 1, 2] and states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert best.run_id in ("1", "2")
