"""Task registry: `--task NAME` selects `src/tasks/NAME.py`, whose `Task` class builds and scores examples.

Adding a task = adding one file with a `Task` subclass of `src.tasks.base.Task` and its name in TASKS (and out of
UNIMPLEMENTED_TASKS, the original's tasks that this project does not have yet: the parser names them as such).
"""

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from src.errors import UserError
from src.tasks.base import Example, Task

TASKS = ("base", "qa")
UNIMPLEMENTED_TASKS = ("mlm", "lm", "multiple_choice", "kilt", "section", "fever")

__all__ = ["TASKS", "UNIMPLEMENTED_TASKS", "Example", "Task", "build_task"]


def build_task(name: str | None, options: Mapping[str, Any] | None = None) -> Task:
    """The task called `name`, given the options (flag name -> value) it declares in its constructor."""
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a known task; choose one of: {', '.join(TASKS)}")
    cls = importlib.import_module(f"src.tasks.{name}").Task
    wanted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in (options or {}).items() if k in wanted})
