"""What is trained. Each task module has a `Task` dataclass (its options) and `build(task, train_config)`,
which returns the keyword arguments of `loop.train` (model, datasets, collator, metrics). No training logic."""

from importlib import import_module

TASKS = ("causal_lm", "text_classification")


def get(name: str):
    from loop.errors import LoopError, closest

    if name not in TASKS:
        raise LoopError(f"unknown task {name!r}{closest(name, TASKS)}; choose one of: {', '.join(TASKS)}")
    return import_module(f"tasks.{name}")
