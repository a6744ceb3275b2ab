"""Task registry: `--task NAME` selects `src/tasks/NAME.py`, whose `Task` class builds and scores examples.

Adding a task = adding one file with a `Task` subclass of `src.tasks.base.Task` and its name in TASKS.
"""

import argparse
import importlib
import inspect

from src.errors import UserError
from src.tasks.base import Example, Task

TASKS = ("base", "qa")

__all__ = ["TASKS", "Example", "Task", "build_task"]


def build_task(name: str | None, opt: argparse.Namespace | None = None) -> Task:
    """The task called `name`, given the task options it declares in its constructor."""
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a known task; choose one of: {', '.join(TASKS)}")
    cls = importlib.import_module(f"src.tasks.{name}").Task
    wanted = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in vars(opt or argparse.Namespace()).items() if k in wanted}
    return cls(**options)
