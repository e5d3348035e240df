"""The CLI: the default job, one-line errors, nothing that looks finished after a failure."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error
from helpers import run_loop as run

pytestmark = pytest.mark.slow  # subprocesses, launches and signals: left out of the quick loop (-m "not slow")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}


def test_default_job_runs_and_held_out_loss_falls(tmp_path):
    proc = run("train", "--output_dir", str(tmp_path), "--disable_tqdm", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"], (evals[0], evals[-1])
    assert "eval_perplexity" in evals[-1]
    losses = [r for r in records if "loss" in r]
    assert all("loop/tokens_per_second" in r for r in losses)
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "config.json")
    assert "held-out loss" in proc.stdout
    # quiet: no warning that does not concern the user (pinning on a CPU, GPT-2's unnamed loss type), no traceback
    for noise in ("pin_memory", "loss_type=None", "Traceback", "Writing model shards"):
        assert noise not in proc.stderr, noise


def test_help_lists_every_field_with_default():
    proc = run("train", "--help")
    assert proc.returncode == 0
    import dataclasses

    import loop

    for f in dataclasses.fields(loop.TrainConfig):
        assert f"--{f.name} (default" in proc.stdout


@pytest.mark.parametrize(
    "args,needles",
    [
        (["train", "--learning_rat", "1e-3"], ["--learning_rat", "did you mean `learning_rate`"]),
        (["train", "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
        (["trian"], ["did you mean `train`"]),
        (["train", "--task", "causal"], ["unknown task", "causal_lm"]),
        (["train", "--max_steps", "many"], ["max_steps", "not a valid int"]),
        (["train", "--use_liger_kernel", "true"], ["use_liger_kernel", "not support"]),
        (["train", "--neftune_noise_alpha", "-1"], ["neftune_noise_alpha must be >= 0"]),
    ],
)
def test_bad_options_give_one_clear_line(tmp_path, args, needles):
    assert_one_line_error(run(*args, "--output_dir", str(tmp_path)), *needles)
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_an_output_dir_that_cannot_be_written_stops_each_command_before_its_work(tmp_path):
    """Not at the first record, nor after the whole evaluation or comparison when the report is written."""
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "out")
    for args in (
        ["train", "--max_steps", "1"],
        ["evaluate", "--model_name_or_path", str(tmp_path / "none")],
        ["compare", "--max_steps", "1"],
        ["bench", "--workload", "tiny-gpt2", "--sides", "loop", "--steps", "2"],
    ):
        if args[0] == "evaluate":  # any folder with weights will do: evaluate refuses before it loads them
            (tmp_path / "none").mkdir(exist_ok=True)
            (tmp_path / "none" / "model.safetensors").write_bytes(b"")
        assert_one_line_error(
            run(*args, "--use_cpu", "true", "--output_dir", bad),
            f"output_dir {bad} cannot be written (Not a directory)",
        )


def test_sigterm_to_the_whole_job_with_loader_workers_saves_and_resumes(tmp_path):
    """enable_jit_checkpoint through the CLI as a scheduler does it: SIGTERM to every process of the job, the loader's
    workers included (they must not die first and take the run with them), mid-run. Exit 143, one line, a complete
    checkpoint and no final model; resuming it ends with the uninterrupted run's log."""
    import signal
    import time

    job = [
        "train",
        "--max_steps",
        "40",
        "--logging_steps",
        "5",
        "--save_steps",
        "1000",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "2",
        "--enable_jit_checkpoint",
        "true",
    ]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loop", *job, "--output_dir", str(out)],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if sum('"loss"' in line for line in lines) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: SIGTERM: stopped at step ") and "Traceback" not in err
    assert [n for n in os.listdir(out) if n.startswith("checkpoint-")] and not (out / "model.safetensors").exists()
    resumed = run(*job, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
    reference = run(*job, "--output_dir", str(tmp_path / "ref"))
    assert resumed.returncode == 0 and reference.returncode == 0, resumed.stderr[-2000:] + reference.stderr[-2000:]

    def losses(folder):
        return {
            r["step"]: (r["loss"], r["grad_norm"])
            for r in map(json.loads, open(folder / "metrics.jsonl"))
            if "loss" in r
        }

    assert losses(out) == losses(tmp_path / "ref") and len(losses(out)) == 8


def test_missing_data_file_and_column(tmp_path):
    proc = run(
        "train",
        "--config",
        "tasks/configs/default.yaml",
        "--text_source",
        "none",
        "--train_file",
        str(tmp_path / "missing.txt"),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert_one_line_error(proc, "missing.txt", "does not exist")
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello world"}\n{"body": "more text here"}\n')
    proc = run(
        "train",
        "--text_source",
        "none",
        "--train_file",
        str(data),
        "--validation_file",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert_one_line_error(proc, "no column 'text'", "--text_column body")
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_empty_dataset_and_model_without_loss(tmp_path):
    import torch
    from helpers import tiny_gpt2

    import loop

    config = loop.TrainConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, disable_tqdm=True)
    with pytest.raises(loop.LoopError, match="empty"):
        loop.train(config, tiny_gpt2(), [])

    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.arange(8)}

    with pytest.raises(loop.LoopError, match="returned no loss.*labels"):
        loop.train(config, tiny_gpt2(), NoLabels())
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")] if os.path.exists(tmp_path) else True


def _write_my_task(root):
    from helpers import doc_block

    (root / "my_lab").mkdir()
    (root / "my_lab" / "__init__.py").write_text("")
    (root / "my_lab" / "my_task.py").write_text(doc_block("# my_lab/my_task.py"))
    (root / "my_lab" / "my_task.yaml").write_text(doc_block("# my_lab/my_task.yaml"))


def run_in(cwd, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "loop", *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout
    )


def test_own_task_module_from_the_readme_trains_compares_evaluates(tmp_path):
    _write_my_task(tmp_path)
    out = tmp_path / "out"
    proc = run_in(
        tmp_path,
        "train",
        "--config",
        "my_lab/my_task.yaml",
        "--num_examples",
        "1024",
        "--output_dir",
        str(out),
        "--disable_tqdm",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(evals) == 2 and evals[-1]["eval_accuracy"] > 0.8, evals
    # its fields are on --help, overridable, and a misspelt module is one line
    proc = run_in(tmp_path, "train", "--help", "--task", "my_lab.my_task")
    assert (
        proc.returncode == 0 and "--num_examples (default 512)" in proc.stdout and "--dim (default 32)" in proc.stdout
    )
    assert_one_line_error(
        run_in(tmp_path, "train", "--config", "my_lab/my_task.yaml", "--task", "my_lab.my_tsk"),
        "unknown task 'my_lab.my_tsk'",
        "no module named",
    )
    assert_one_line_error(
        run_in(tmp_path, "train", "--config", "my_lab/my_task.yaml", "--num_exampels", "3"),
        "did you mean `num_examples`",
    )
    # loop evaluate: the saved (plain-module) weights give the run's final eval numbers
    proc = run_in(
        tmp_path,
        "evaluate",
        "--config",
        "my_lab/my_task.yaml",
        "--model_name_or_path",
        str(out),
        "--output_dir",
        str(tmp_path / "ev"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(tmp_path / "ev" / "eval_results.json"))
    assert got["eval_accuracy"] == evals[-1]["eval_accuracy"] and got["eval_loss"] == evals[-1]["eval_loss"]
    # loop compare: Trainer gets the task's compute_loss_func too; bit for bit on CPU
    proc = run_in(tmp_path, "compare", "--config", "my_lab/my_task.yaml", "--output_dir", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert report["parity"] and report["difference"]["loss"]["max_abs"] == 0 and report["identical_initial_weights"]


def test_bench_clock_waits_for_the_device_once_where_the_steady_window_starts(monkeypatch):
    """The host runs ahead of the GPU: the steady-state window must start when the warm-up's work is done, not when
    its last step was queued. One sync at step `skip`, none at the other steps."""
    from loop import compare

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(compare.time.perf_counter()))
    clock = compare._StepClock(skip=3)
    for step in range(1, 8):
        clock.step(step)
    clock.end()
    assert len(syncs) == 1 and syncs[0] <= clock.t0 and clock.rate() > 0


def test_parameter_counts_see_through_zero3_placeholders():
    """Under DeepSpeed ZeRO-3 a parameter outside DeepSpeed's gathers is an empty placeholder whose real size is
    ds_numel: on one H100, `loop bench` counted 1.0M parameters for a 1.56B model and reported 0.6% MFU for 6.1%."""
    from helpers import tiny_gpt2

    from loop.compare import model_shape
    from loop.telemetry import parameter_count

    model = tiny_gpt2()
    total, body = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    assert parameter_count(model) == total and parameter_count(model, exclude_embeddings=True) == body < total
    for p in model.parameters():  # what ZeRO-3 leaves between gathers
        p.ds_numel, p.data = p.numel(), torch.empty(0)
    assert model.num_parameters() == 0  # transformers' own count sees the placeholders
    assert parameter_count(model) == total and parameter_count(model, exclude_embeddings=True) == body
    assert model_shape(model)["params"] == total


def test_loop_bench_smoke_on_a_tiny_cpu_workload(tmp_path):
    """Each side in its own process; steady-state rates, the FLOP count, and (CPU, fp32) the same final loss."""
    proc = run(
        "bench",
        "--workload",
        "tiny-gpt2",
        "--sides",
        "trainer,loop",
        "--steps",
        "8",
        "--use_cpu",
        "true",
        "--logging_steps",
        "2",
        "--output_dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "bench.json"))
    trainer, ours = report["sides"]
    assert [trainer["side"], ours["side"]] == ["trainer", "loop"] and report["device"] == "cpu"
    for side in (trainer, ours):
        assert side["tokens_per_second"] > 0 and side["ms_per_step"] > 0
        assert side["tokens_per_second"] == pytest.approx(side["samples_per_second"] * 128, rel=1e-6)  # 128-token rows
        # the whole run's time holds at least the 7 steady steps (the first is left out of the rates as warm-up)
        assert 7 * side["ms_per_step"] / 1000 <= side["train_runtime_s"] < 600
    assert trainer["train_loss"] == ours["train_loss"] and trainer["curve"] == ours["curve"]
    assert [s for s, _ in ours["curve"]] == [2, 4, 6, 8] and ours["last_loss"] == ours["curve"][-1][1]
    n, layers, heads, head_dim = ours["params"], 2, 2, 32
    assert ours["flops_per_token"] == pytest.approx(6 * n + 12 * layers * heads * head_dim * 128)
    assert "MFU = (6N + 12*L*H*Q*T)" in proc.stdout and os.path.exists(tmp_path / "bench.png")
    written = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert "metrics.jsonl" in written and "model.safetensors" not in written  # the loop side keeps no final model
    ratio = ours["tokens_per_second"] / trainer["tokens_per_second"]
    assert f"loop tokens/s: {ratio:.2f}x trainer" in proc.stdout
    assert_one_line_error(run("bench", "--workload", "gpt3"), "unknown workload", "gpt2-124m")


def test_loop_evaluate_without_a_saved_model_is_one_line(tmp_path):
    assert_one_line_error(run("evaluate", "--model_name_or_path", str(tmp_path / "nothing")), "no model.safetensors")


def test_compare_script_runs_an_unmodified_trainer_script_under_both_trainers(tmp_path):
    """docs/trainer.md's command: the example script as written and with loop.Trainer, exact parity on CPU."""
    from helpers import doc_block

    line = doc_block("loop compare --report_dir outputs/compare-script --script").strip()
    argv = shlex.split(line)[1:] + ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]
    argv[argv.index("--report_dir") + 1] = str(tmp_path / "report")
    proc = run(*argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.load(open(tmp_path / "report" / "compare.json"))
    assert report["parity"] and report["difference"]["steps_compared"] >= 6
    assert report["difference"]["loss"]["max_abs"] == 0 and report["difference"]["eval_records"] == [2, 2]
    assert report["global_step"] == {"trainer": 12, "loop": 12}
    assert "verdict: PARITY" in proc.stdout
    assert_one_line_error(run("compare", "--script", str(tmp_path / "none.py")), "no such file")
