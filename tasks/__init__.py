"""What is trained. Each task module has a `Task` dataclass (its options) and `build(task, train_config)`,
which returns the keyword arguments of `loop.train` (model, datasets, collator, metrics, and optionally the
hooks compute_loss_func, optimizers, optimizer_cls_and_kwargs, model_init, optimizer_step). No training logic.

`task:` in a job file names a built-in task (below), any importable module (`my_lab.my_task`, looked up from the
current directory too, as `python -m` would), or a `.py` file.
"""

import dataclasses
import importlib
import importlib.util
import os
import sys

TASKS = ("causal_lm", "text_classification")


def get(name: str):
    """The task module for `name`; one clear line if it cannot be found or is not a task module."""
    from loop.errors import LoopError, closest

    name = str(name)
    if name in TASKS:
        return importlib.import_module(f"{__name__}.{name}")  # loop.tasks.<name>
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise LoopError(f"task file {name} does not exist; check the path, or name a module (my_lab.my_task)")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise LoopError(f"task file {name} failed to import: {e}; install what it needs") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # the `loop` console script does not put the cwd on the path
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise LoopError(
                    f"unknown task {name!r}: no module named {e.name!r}{closest(name, TASKS)}; "
                    f"use a built-in task ({', '.join(TASKS)}) or an importable module "
                    "(run from the folder that holds it, or put it on PYTHONPATH)"
                ) from None
            raise LoopError(f"task module {name!r} failed to import: {e}; install what it needs") from None
        except ImportError as e:
            raise LoopError(f"task module {name!r} failed to import: {e}") from None
    task_cls = getattr(module, "Task", None)
    if not (isinstance(task_cls, type) and dataclasses.is_dataclass(task_cls)) or not callable(
        getattr(module, "build", None)
    ):
        raise LoopError(
            f"{name!r} is not a task module: it needs a `@dataclass class Task` (its options) and "
            "`build(task, train_config)` returning loop.train's keyword arguments"
        )
    return module
