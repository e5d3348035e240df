"""Kill real training processes (SIGKILL) at several moments, resume, and get the uninterrupted run's log."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import LMData, same_history, tiny_gpt2

import loop
import loop.checkpoint as ckpt

pytestmark = pytest.mark.slow  # subprocesses, launches and signals: left out of the quick loop (-m "not slow")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: helpers and workers/
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}


def run_worker(out, *args):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "workers", "resume_worker.py"), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def worker(out, *args, expect_kill=False):
    proc = run_worker(out, *args)
    if expect_kill:
        assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.load(open(os.path.join(out, "result.json")))


def metrics_lines(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


SCENARIOS = {
    # name: (train args, kill args)
    "kill_after_step_mid_epoch": ([], ["kill_after_step=8"]),
    "kill_mid_accumulation_window": ([], ["kill_in_microbatch=19"]),
    "kill_while_saving": ([], ["kill_in_save=9"]),
    "epoch_end_checkpoints_with_workers": (
        ["save_strategy=epoch", "dataloader_num_workers=2", "max_steps=-1", "num_train_epochs=3"],
        ["kill_after_step=8"],
    ),
    "save_mid_window_logging_every_4": (["logging_steps=4"], ["kill_after_step=7"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(args):
        key = tuple(args)
        if key not in cache:
            cache[key] = worker(tmp_path_factory.mktemp("ref"), *args)
        return cache[key]

    return get


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sigkill_then_resume_reproduces_uninterrupted_log(tmp_path, reference, name):
    args, kill = SCENARIOS[name]
    expected = reference(args)
    worker(tmp_path, *args, *kill, expect_kill=True)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    if name == "kill_while_saving":
        assert leftovers, "the kill should have left a temporary folder"
        assert not os.path.exists(tmp_path / "checkpoint-9")
    assert not os.path.exists(tmp_path / "model.safetensors"), "a killed run must not look finished"
    got = worker(tmp_path, *args, "resume=latest")
    same_history(expected, got)
    lines = metrics_lines(tmp_path)
    assert any(line.get("event") == "resumed" for line in lines)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.parametrize("step", [8, 9])  # 9 saves anyway (save_steps 3): that checkpoint serves, no second save
def test_sigterm_saves_a_checkpoint_and_stops_then_resume_is_exact(tmp_path, reference, step):
    """enable_jit_checkpoint: SIGTERM after step N leaves a complete checkpoint-N, exit status 143, one line, no final
    model; resuming it gives the uninterrupted run's log. The field changes no number of an uninterrupted run.
    (tests/integration/test_cli.py signals a whole job, loader workers included.)"""
    args = ["enable_jit_checkpoint=true"]
    expected = reference(args)
    same_history(reference([]), expected)
    proc = run_worker(tmp_path, *args, f"term_after_step={step}")
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: SIGTERM: stopped at step {step} of 14 and saved {tmp_path / f'checkpoint-{step}'}; continue with "
        "--resume_from_checkpoint latest"
    )
    assert ckpt.list_checkpoints(str(tmp_path))[-1] == (step, str(tmp_path / f"checkpoint-{step}"))
    assert not os.path.exists(tmp_path / "model.safetensors"), "a preempted run must not look finished"
    assert [line["step"] for line in metrics_lines(tmp_path) if line.get("event") == "preempted"] == [step]
    same_history(expected, worker(tmp_path, *args, "resume=latest"))


def test_sigterm_after_the_last_step_lets_the_run_finish(tmp_path, reference):
    """A SIGTERM while the final model is written: nothing is left to checkpoint, so the run completes (exit 0, the
    final model, the uninterrupted log) instead of dying half-saved."""
    args = ["enable_jit_checkpoint=true"]
    same_history(reference(args), worker(tmp_path, *args, "term_in_final_save=1"))
    assert os.path.exists(tmp_path / "model.safetensors")


def test_sigterm_handler_is_put_back_after_training(tmp_path):
    import signal

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    try:
        loop.train(_train(tmp_path, max_steps=2, enable_jit_checkpoint=True), tiny_gpt2(), LMData(16))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_partial_and_junk_checkpoints_are_skipped_with_a_warning(tmp_path, reference):
    worker(tmp_path, "kill_after_step=8", expect_kill=True)
    (tmp_path / "checkpoint-99").mkdir()  # junk: no marker
    (tmp_path / "checkpoint-99" / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "checkpoint-98").mkdir()  # marker but unreadable state
    (tmp_path / "checkpoint-98" / "COMPLETE").write_text("98")
    (tmp_path / "checkpoint-98" / "loop_state.json").write_text("{not json")
    (tmp_path / "checkpoint-nonsense").mkdir()
    with pytest.warns(UserWarning, match="checkpoint-99"):
        assert ckpt.resolve_resume("latest", str(tmp_path)).endswith("checkpoint-6")
    same_history(reference([]), worker(tmp_path, "resume=latest"))


def _train(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=1,
        save_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        disable_tqdm=True,
        telemetry=False,
    )
    base.update(kw)
    return loop.TrainConfig(**base)


def test_rotation_keeps_best_and_newest(tmp_path):
    config = _train(
        tmp_path,
        save_total_limit=1,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="loss",
        learning_rate=5e-2,
    )
    # a large learning rate makes the eval loss go up after a while, so the best is not the newest
    result = loop.train(config, tiny_gpt2(), LMData(40), eval_dataset=LMData(8, seed=1))
    evals = [(r["step"], r["eval_loss"]) for r in result.log_history if "eval_loss" in r]
    best_step = min(evals, key=lambda e: e[1])[0]
    kept = sorted(int(n.split("-")[1]) for n in os.listdir(tmp_path) if n.startswith("checkpoint-"))
    assert best_step in kept
    assert len(kept) <= 2


def test_rotation_ignores_partial_folders(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "loop_state.json").write_text("{}")
        (tmp_path / f"checkpoint-{step}" / "COMPLETE").write_text("")
    (tmp_path / "checkpoint-8").mkdir()  # partial: not counted, not deleted by rotation
    deleted = ckpt.rotate(str(tmp_path), 2, keep=(str(tmp_path / "checkpoint-2"),))
    assert [os.path.basename(p) for p in deleted] == ["checkpoint-4"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]


def test_disk_full_during_save_fails_loudly_and_keeps_previous(tmp_path, monkeypatch):
    import errno

    real = ckpt.save_weights
    calls = {"n": 0}

    def full(state_dict, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state_dict, path)

    monkeypatch.setattr(ckpt, "save_weights", full)
    with pytest.raises(loop.LoopError, match="No space left.*intact"):
        loop.train(_train(tmp_path), tiny_gpt2(), LMData(40))
    assert ckpt.is_complete(str(tmp_path / "checkpoint-2"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_changed_batch_geometry_is_refused_unless_overridden(tmp_path):
    loop.train(_train(tmp_path, max_steps=2), tiny_gpt2(), LMData(40))
    with pytest.raises(loop.LoopError, match="per_device_train_batch_size 4 -> 2"):
        loop.train(
            _train(tmp_path, per_device_train_batch_size=2), tiny_gpt2(), LMData(40), resume_from_checkpoint="latest"
        )
    with pytest.raises(loop.LoopError, match="train_examples 40 -> 44"):
        loop.train(_train(tmp_path), tiny_gpt2(), LMData(44), resume_from_checkpoint="latest")
    result = loop.train(
        _train(tmp_path, per_device_train_batch_size=2, allow_inexact_resume=True),
        tiny_gpt2(),
        LMData(40),
        resume_from_checkpoint="latest",
    )
    assert result.global_step == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(loop.LoopError, match="no complete checkpoint"):
        loop.train(_train(tmp_path), tiny_gpt2(), LMData(40), resume_from_checkpoint=True)


class _Big:
    """A large map-style dataset whose rows cost nothing to make (to time the resume itself)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        return {"input_ids": torch.full((8,), i % 64), "labels": torch.full((8,), i % 64)}


class _FirstStepTimer(loop.Callback):
    def on_train_begin(self, run):
        self.start = time.perf_counter()

    def on_step_end(self, run):
        if not hasattr(self, "elapsed"):
            self.elapsed = time.perf_counter() - self.start


def test_time_to_resume_does_not_grow_with_the_step(tmp_path):
    n = 2_000_000
    config = _train(tmp_path, max_steps=400_000, save_steps=1, per_device_train_batch_size=4)
    stop = type(
        "Stop", (loop.Callback,), {"on_step_end": lambda self, run: "stop" if run.state.global_step >= 1 else None}
    )
    loop.train(config, tiny_gpt2(), _Big(n), callbacks=[stop()])
    early = tmp_path / "checkpoint-1"
    late = tmp_path / "checkpoint-450000"
    shutil.copytree(early, late)
    state = json.loads((late / "loop_state.json").read_text())
    state["global_step"] = state["batches_in_epoch"] = 450_000  # 1.8M of 2M rows consumed
    (late / "loop_state.json").write_text(json.dumps(state))
    from loop import checkpoint as ckpt  # the forged state gets its own manifest, as a real save would write

    (late / "COMPLETE").write_text(json.dumps({"step": 450_000, "files": ckpt.manifest(str(late))}))
    timings = {}
    for name, path in (("early", early), ("late", late)):
        timer = _FirstStepTimer()
        loop.train(
            _train(tmp_path, max_steps=450_010, save_strategy="no", per_device_train_batch_size=4),
            tiny_gpt2(),
            _Big(n),
            callbacks=[timer, stop()] if name == "early" else [timer],
            resume_from_checkpoint=str(path),
        )
        timings[name] = timer.elapsed
    assert timings["late"] < 3 * timings["early"] + 1.0, timings


def test_best_checkpoint_survives_resume(tmp_path):
    config = _train(
        tmp_path, eval_strategy="steps", eval_steps=2, metric_for_best_model="loss", learning_rate=5e-2, max_steps=8
    )
    stop = type("S", (loop.Callback,), {"on_step_end": lambda s, run: "stop" if run.state.global_step == 6 else None})
    loop.train(config, tiny_gpt2(), LMData(40), eval_dataset=LMData(8, seed=1), callbacks=[stop()])
    saved = ckpt.read_state(str(tmp_path / "checkpoint-6"))
    assert saved.best_checkpoint == str(tmp_path / f"checkpoint-{saved.best_global_step}")
    result = loop.train(config, tiny_gpt2(), LMData(40), eval_dataset=LMData(8, seed=1), resume_from_checkpoint=True)
    evals = [(r["eval_loss"], r["step"]) for r in result.log_history if "eval_loss" in r]
    assert os.path.isdir(tmp_path / f"checkpoint-{min(evals)[1]}")
