"""`loop train|compare|fields [--config FILE.yaml] [--<field> VALUE ...]` (also `python -m loop ...`).

A job is one flat YAML mapping: `task:` picks the task module, TrainConfig fields and the task's own fields sit
side by side. With no --config the embedded default job (tasks/configs/default.yaml) runs. Command-line
`--field value` pairs override the file. Errors print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

from .config import TrainConfig, coerce
from .errors import LoopError, closest

COMMANDS = ("train", "compare", "fields")
DEFAULT_JOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "configs", "default.yaml")


def parse_overrides(argv: list[str]) -> dict:
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise LoopError(f"unexpected argument {arg!r}; options look like --name value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --bf16
        out[name] = value
        i += 1
    return out


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise LoopError(f"config file {path} does not exist; check the path (examples are in tasks/configs/)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LoopError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise LoopError(f"config file {path} must be a mapping of field: value")
    return data


def task_fields(task_name: str):
    import tasks

    return {f.name: f for f in dataclasses.fields(tasks.get(task_name).Task)}


def build_job(argv: list[str]):
    """(TrainConfig, task module, task config) from --config and overrides; one clear line on any mistake."""
    import tasks

    overrides = parse_overrides(argv)
    path = overrides.pop("config", None)
    values = load_yaml(path or DEFAULT_JOB)
    values.update(overrides)
    task_name = str(values.pop("task", "causal_lm"))
    module = tasks.get(task_name)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tfields = task_fields(task_name)
    unknown = [k for k in values if k not in train_fields and k not in tfields]
    if unknown:
        k = unknown[0]
        from .config import REFUSED

        if k in REFUSED:
            raise LoopError(f"--{k} is a TrainingArguments option the loop does not support: {REFUSED[k]}")
        raise LoopError(f"unknown option --{k}{closest(k, list(train_fields) + list(tfields))}; "
                        "`loop train --help` lists every option")
    hints = typing.get_type_hints(module.Task)
    task_values = {k: coerce(k, v, hints[k]) for k, v in values.items() if k in tfields}
    config = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    return config, module, module.Task(**task_values)


def _help(task_name="causal_lm") -> str:
    lines = [__doc__.strip(), "", "Training options (TrainConfig; Trainer's names and defaults):"]
    for group, title in (("trainer", None), ("loop", "Loop-only options (off or inert by default):")):
        if title:
            lines += ["", title]
        for f in dataclasses.fields(TrainConfig):
            if f.metadata["group"] == group:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  --{f.name} (default {default!r}): {f.metadata['help']}")
    import tasks

    for name in tasks.TASKS:
        lines += ["", f"Task options for task: {name}:"]
        for f in task_fields(name).values():
            lines.append(f"  --{f.name} (default {f.default!r}): {f.metadata.get('help', '')}")
    lines += ["", "Commands: loop train | loop compare | loop fields (TrainingArguments coverage table)"]
    return "\n".join(lines)


def cmd_train(argv):
    from .fit import train

    from transformers import set_seed

    config, module, task = build_job(argv)
    set_seed(config.seed)  # initial weights of a model built from a config (or a new head) follow the seed
    built = module.build(task, config)
    result = train(config, **built)
    if result.metrics and _is_main():
        evals = [r for r in result.log_history if "eval_loss" in r]
        if evals:
            first, last = evals[0], evals[-1]
            print(f"held-out loss: {first['eval_loss']:.4f} (step {first['step']}) -> "
                  f"{last['eval_loss']:.4f} (step {last['step']})")
        print(f"done: {result.global_step} steps, train_loss {result.training_loss:.4f}, "
              f"model saved to {config.output_dir}")
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
    if "-h" in rest or "--help" in rest:
        print(_help())
        return 0
    try:
        if cmd not in COMMANDS:
            raise LoopError(f"unknown command {cmd!r}{closest(cmd, COMMANDS)}; use one of: {', '.join(COMMANDS)}")
        if cmd == "train":
            return cmd_train(rest)
        if cmd == "fields":
            return cmd_fields(rest)
        from .compare import cmd_compare

        return cmd_compare(rest)
    except LoopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130


def entry():
    sys.exit(main())
