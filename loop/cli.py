"""`loop train|evaluate|compare|bench|search|fields [--config FILE.yaml] [--<field> VALUE ...]` (also `python -m loop`).

A job is one flat YAML mapping: `task:` picks the task module (a built-in task, any importable module
`my_lab.my_task`, or a .py file), TrainConfig fields and the task's own fields sit side by side. With no --config
the embedded default job (tasks/configs/default.yaml) runs. Command-line `--field value` pairs override the file.
`loop evaluate --config JOB --model_name_or_path DIR` evaluates a saved model (and its ema/) on the job's
held-out data. Errors print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from .config import TrainConfig
from .errors import LoopError, closest
from .job import (
    DEFAULT_TASK,
    build_job,
    build_task,
    evaluate_built,
    job_from_values,
    job_values,
    parse_overrides,
    task_fields,
    task_module,
)

COMMANDS = ("train", "evaluate", "compare", "bench", "search", "fields")


def _help(argv=()) -> str:
    """Every option; the task options of the job's task (`--task NAME` or the job file's), else of each built-in."""
    lines = [__doc__.strip(), "", "Training options (TrainConfig; Trainer's names and defaults):"]
    for group, title in (("trainer", None), ("loop", "Loop-only options (off or inert by default):")):
        if title:
            lines += ["", title]
        for f in dataclasses.fields(TrainConfig):
            if f.metadata["group"] == group:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  --{f.name} (default {default!r}): {f.metadata['help']}")
    from . import tasks

    argv = [a for a in argv if a not in ("-h", "--help")]
    named = {"config", "task"} & set(parse_overrides(argv))
    values = job_values(argv) if named else {}
    names = [values.get("task", DEFAULT_TASK)] if named else list(tasks.TASKS)
    for name in names:
        module = task_module(name)
        lines += [
            "",
            f"Task options for task: {name}"
            + (f" ({module.__doc__.strip().splitlines()[0]})" if module.__doc__ else "")
            + ":",
        ]
        for f in task_fields(module).values():
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else "required"
            )
            lines.append(f"  --{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    lines += [
        "",
        "Commands: loop train | loop evaluate | loop compare | loop bench | loop search | loop fields (TrainingArguments "
        "coverage table)",
        "Task options of your own task module: loop train --help --task my_lab.my_task",
    ]
    return "\n".join(lines)


def cmd_train(argv):
    from .fit import train

    config, module, task = build_job(argv)
    result = train(config, **build_task(module, task, config))
    if result.metrics and _is_main():
        evals = [r for r in result.log_history if "eval_loss" in r]
        if evals:
            first, last = evals[0], evals[-1]
            print(
                f"held-out loss: {first['eval_loss']:.4f} (step {first['step']}) -> "
                f"{last['eval_loss']:.4f} (step {last['step']})"
            )
        print(
            f"done: {result.global_step} steps, train_loss {result.training_loss:.4f}, "
            f"model saved to {config.output_dir}"
        )
    return 0


def cmd_evaluate(argv):
    """Evaluate a saved model (`--model_name_or_path DIR`, as written by `loop train`) on the job's eval data,
    and DIR/ema too when it exists. Prints the metrics and writes <output_dir>/eval_results.json."""
    import json

    from . import checkpoint as ckpt

    values = job_values(argv)
    folder = values.get("model_name_or_path")
    if not folder:
        raise LoopError(
            "loop evaluate needs --model_name_or_path DIR, a folder written by `loop train` "
            "(its model.safetensors, and ema/ when the run kept an EMA)"
        )
    if not os.path.isfile(os.path.join(str(folder), "model.safetensors")):
        raise LoopError(
            f"--model_name_or_path {folder} holds no model.safetensors; point it at the output_dir of "
            "a finished run (or a checkpoint-<step> folder)"
        )
    module = task_module(values.get("task", DEFAULT_TASK))
    # a folder with config.json (a final model) builds the task's model from it; otherwise (a plain module, a
    # checkpoint-<step>) the job builds its model and the saved weights are loaded into it
    if "model_name_or_path" not in task_fields(module) or not os.path.isfile(os.path.join(folder, "config.json")):
        values.pop("model_name_or_path")
    config, module, task = job_from_values(values)
    config.eval_strategy = "no"
    if problem := ckpt.unwritable(config.output_dir):  # every rank, so that none waits for one that stopped
        raise LoopError(problem)  # before the evaluation, not after it
    built = build_task(module, task, config)
    if built.get("eval_dataset") is None:
        raise LoopError(f"task {module.__name__} built no eval_dataset; give it held-out data (e.g. --validation_file)")
    from .run import call_model_init

    model = built.get("model") or call_model_init(built["model_init"])
    results = {}
    for prefix, path in (("eval", folder), ("eval_ema", os.path.join(folder, "ema"))):
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            continue
        ckpt.load_weights(model, path)  # the task's model, with the saved weights (any nn.Module)
        results.update(evaluate_built(config, model, built, metric_key_prefix=prefix))
    if _is_main():
        for k, v in results.items():  # printed first: a file that cannot be written loses nothing
            print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
        out = os.path.join(config.output_dir, "eval_results.json")
        os.makedirs(config.output_dir, exist_ok=True)
        with open(out, "w") as f:
            json.dump({"model": os.path.abspath(folder), **results}, f, indent=1)
        print(f"written to {out}")
    return 0


def cmd_fields(argv):
    from .config import coverage

    print("| TrainingArguments field | loop | note |\n|---|---|---|")
    for name, status, note in coverage():
        print(f"| `{name}` | {status} | {note} |")
    return 0


def _is_main():
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if "-h" in rest or "--help" in rest:
            print(_help(rest))
            return 0
        if cmd not in COMMANDS:
            raise LoopError(f"unknown command {cmd!r}{closest(cmd, COMMANDS)}; use one of: {', '.join(COMMANDS)}")
        if cmd == "train":
            return cmd_train(rest)
        if cmd == "fields":
            return cmd_fields(rest)
        if cmd == "evaluate":
            return cmd_evaluate(rest)
        if cmd == "bench":
            from .bench import cmd_bench

            return cmd_bench(rest)
        if cmd == "search":
            from .search_cli import cmd_search

            return cmd_search(rest)
        from .compare import cmd_compare

        return cmd_compare(rest)
    except LoopError as e:
        from .preempt import Preempted

        print(f"error: {e}", file=sys.stderr)
        return 143 if isinstance(e, Preempted) else 2  # 128 + SIGTERM: a scheduler requeues on it
    except KeyboardInterrupt:
        print("interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130


def entry():
    code = main()
    leave_process_group(code)
    sys.exit(code)


def leave_process_group(code: int):
    """Under a multi-process launch: wait for every rank, destroy the process group, and exit without interpreter
    teardown. Every result is written by then; a communication thread destroyed at teardown can otherwise abort a
    finished run ("terminate called without an active exception", SIGABRT) and turn its exit status non-zero."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
