"""The docs run as written: every shell and Python block of README.md and docs/ is run by a test (here, or by the
test named in RUN_ELSEWHERE), or is marked as needing a GPU (`<!-- gpu -->`) or a manual setup
(`<!-- manual: why -->`) on the line before it. The README stays a README (at most 300 lines)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from helpers import doc_block, doc_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}

# blocks run by another test, by their first line
RUN_ELSEWHERE = {
    "loop compare --report_dir outputs/compare-script --script": "tests/integration/test_cli.py::"
    "test_compare_script_runs_an_unmodified_trainer_script_under_both_trainers",
    "loop search --hp_space docs/examples/search_space.yaml --n_trials 3": "tests/integration/test_search_cli.py::"
    "test_docs_search_command_runs_as_written",
    "torchrun --nproc_per_node 2 -m loop train --use_cpu true --max_steps 10": "tests/integration/"
    "test_distributed.py::test_sharded_optimizer_from_the_docs_gives_ddps_numbers_and_bf16_reduction_moves_them_by_"
    "rounding_only",
    "torchrun --nproc_per_node 2 -m loop search": "tests/integration/test_search_cli.py::"
    "test_a_search_under_two_processes_runs_every_trial_on_both",
    "torchrun --nproc_per_node 2 -m loop compare": "tests/integration/test_distributed.py::"
    "test_compare_script_from_the_docs_under_two_processes",
    "python3 -m venv .venv": ".ci/run (test_the_install_block_is_what_ci_runs checks it)",
    "python -m pytest -q tests -m": ".ci/run runs the whole suite, of which this is the part without the slow tests",
    "# fgm_step": "tests/parity/test_customise.py::test_fgm_step_from_the_readme_trains_and_equals_the_default_step_at_eps_0",
    "# my_lab/my_task.py": "tests/integration/test_cli.py::test_own_task_module_from_the_readme_trains_compares_evaluates",
    "loop train --config my_lab/my_task.yaml": "tests/integration/test_cli.py::test_own_task_module_from_the_readme_trains_compares_evaluates",
}
# blocks this module runs, by their first line
PYTHON_HERE = (
    "import torch\nfrom transformers import GPT2Config",
    "class StopAtLoss(loop.Callback):",
    "class Classifier(torch.nn.Module):",
    "# the plan of a fast run on a CPU",
    "# a Trainer subclass, with only the import changed",
    "# Trainer continues from the loop's checkpoint",
    "# a search with Trainer's signature",
)
SHELL_HERE = (
    "loop train --max_steps 20 --eval_steps 10 --save_steps 10 --output_dir outputs/small",
    "loop train --max_steps 20 --eval_steps 10 --save_steps 10 --ema_decay 0.99",
)


def test_every_shell_and_python_block_is_run_or_marked():
    unrun = []
    for path, lang, body, marker in doc_blocks():
        if lang not in ("bash", "sh", "python"):
            continue
        ours = any(body.startswith(first) for first in PYTHON_HERE + SHELL_HERE + tuple(RUN_ELSEWHERE))
        if not ours and not marker.startswith(("<!-- gpu", "<!-- manual:")):
            unrun.append(f"{path}: {body.splitlines()[0]}")
    assert not unrun, (
        "blocks no test runs (run them in a test, or mark <!-- gpu --> / <!-- manual: why -->):\n" + "\n".join(unrun)
    )


def test_readme_is_short_and_starts_with_install_first_run_and_tests():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 300
    first_screen = "\n".join(text.splitlines()[:40])
    assert "pip install -e" in first_screen and "loop train" in first_screen and "pytest" in first_screen


def test_the_install_block_is_what_ci_runs():
    block = doc_block("python3 -m venv .venv")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    for line in block.splitlines():
        command = line.split("#")[0].strip()
        if command and command != "loop train":  # the default job: tests/integration/test_cli.py::test_default_job...
            for part in command.split("&&"):
                assert part.strip() in ci, part


def test_python_examples_run_as_written(tmp_path, monkeypatch):
    """The README's example, then docs/api.md's, in one namespace (the API page continues from the README)."""
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__docs__"}
    exec(doc_block(PYTHON_HERE[0]), scope)
    assert scope["result"].global_step == 20
    assert any("eval_ema_loss" in r for r in scope["result"].log_history)
    assert (tmp_path / "outputs" / "api" / "model.safetensors").exists()
    exec(doc_block(PYTHON_HERE[1]), scope)
    assert scope["result"].global_step <= 30
    exec(doc_block(PYTHON_HERE[2]), scope)


def test_fast_path_example_prints_its_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__docs__"}
    exec(doc_block(PYTHON_HERE[3]), scope)
    plan = scope["plan"]
    assert not plan.cuda_graph_step.on and "CUDA device" in plan.cuda_graph_step.why
    assert plan.fused_linear_cross_entropy.on and plan.torch_compile.on and plan.dataset_on_device.on
    assert plan.report()[:4] == [
        "dataset_on_device",
        "fused_linear_cross_entropy",
        "skip_causal_mask",
        "torch_compile",
    ]


def test_drop_in_trainer_example_runs_on_the_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__docs__"}
    exec(doc_block(PYTHON_HERE[4]), scope)
    assert scope["output"].global_step == 8 and "eval_loss" in scope["metrics"]
    assert type(scope["trainer"]).__mro__[1].__module__ == "loop.trainer"
    printed = capsys.readouterr().out
    assert "step 2: loss" in printed and "step 8: loss" in printed
    # then the same subclass on transformers' Trainer continues from the loop's checkpoint-4
    exec(doc_block(PYTHON_HERE[5]), scope)
    assert scope["resumed"].global_step == 8
    assert (tmp_path / "outputs" / "interop-trainer" / "checkpoint-8").is_dir()
    ours, theirs = (
        [(r["step"], r["eval_loss"]) for r in t.state.log_history if "eval_loss" in r]
        for t in (scope["ours"], scope["theirs"])
    )
    assert ours == theirs and len(ours) == 2  # steps 4 and 8: the loop's, and Trainer's after resuming the loop's


def test_search_example_runs_with_trainers_signature(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__docs__"}
    exec(doc_block(PYTHON_HERE[6]), scope)
    best = scope["best"]
    assert best.run_id in ("0", "1", "2") and 1e-4 <= best.hyperparameters["learning_rate"] <= 1e-2
    runs = sorted(os.listdir(tmp_path / "outputs" / "search-api"))
    assert runs == ["run-0", "run-1", "run-2"]
    assert scope["trainer"].args.learning_rate == 5e-5  # the arguments given, again


def _run_shell_block(first_line, cwd):
    for line in doc_block(first_line).splitlines():
        command = line.split("  #")[0].strip()
        if not command:
            continue
        argv = shlex.split(command)
        assert argv[0] == "loop", command
        proc = subprocess.run(
            [sys.executable, "-m", "loop", *argv[1:], "--disable_tqdm", "true"],
            cwd=cwd,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        yield command, proc


@pytest.mark.slow
def test_readme_cli_block_runs_as_written(tmp_path):
    """`loop train`, then `loop compare` on the default job: exact parity on CPU, to the last eval metric."""
    (train, _), (compare, proc) = _run_shell_block(SHELL_HERE[0], tmp_path)
    records = [json.loads(line) for line in open(tmp_path / "outputs" / "small" / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 10, 20]
    report = json.load(open(tmp_path / "outputs" / "compare" / "compare.json"))
    assert report["parity"] is True and report["tolerance_rel"] == 0.0
    assert report["difference"]["loss"]["max_abs"] == 0.0 and report["difference"]["steps_compared"] == 6
    assert report["trainer"]["final_eval"]["eval_loss"] == report["loop"]["final_eval"]["eval_loss"]
    assert (tmp_path / "outputs" / "compare" / "compare.png").stat().st_size > 10_000
    assert "verdict: PARITY" in proc.stdout
    # the report holds the run's plan: every lever off, and why (the default path)
    assert report["fast"]["fast"] is False and report["fast"]["cuda_graph_step"] == "off (not asked for)"


@pytest.mark.slow
def test_api_page_train_then_evaluate_runs_as_written(tmp_path):
    """A saved model and its EMA evaluated by `loop evaluate`: the same numbers as the run's last evaluation."""
    (_, _), (_, proc) = _run_shell_block(SHELL_HERE[1], tmp_path)
    records = [json.loads(line) for line in open(tmp_path / "outputs" / "small" / "metrics.jsonl")]
    last = [r for r in records if "eval_loss" in r][-1]
    last_ema = [r for r in records if "eval_ema_loss" in r][-1]
    got = json.load(open(tmp_path / "outputs" / "small-eval" / "eval_results.json"))
    assert got["eval_loss"] == last["eval_loss"] and got["eval_ema_loss"] == last_ema["eval_ema_loss"]
    assert got["eval_loss"] != got["eval_ema_loss"]
    assert "eval_ema_loss" in proc.stdout
