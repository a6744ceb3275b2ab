"""Task registry: `--task NAME` selects `src/tasks/NAME.py`, whose `Task` class builds and scores examples.

Adding a task = adding one file `src/tasks/NAME.py` with a `Task` subclass of `src.tasks.base.Task` (and its name in
ORIGINAL_TASKS if it is not one of the original's). A name of the original without its file is refused by the parser
as not implemented yet.
"""

import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from src.errors import UserError
from src.tasks.base import Example, Task

ORIGINAL_TASKS = ("base", "mlm", "lm", "multiple_choice", "kilt", "section", "fever", "qa")  # the original's order
TASKS = tuple(name for name in ORIGINAL_TASKS if (Path(__file__).parent / f"{name}.py").is_file())
UNIMPLEMENTED_TASKS = tuple(name for name in ORIGINAL_TASKS if name not in TASKS)

__all__ = ["TASKS", "UNIMPLEMENTED_TASKS", "Example", "Task", "build_task"]


def build_task(name: str | None, options: Mapping[str, Any] | None = None, tokenizer: Any = None) -> Task:
    """The task called `name`, given the options (flag name -> value) it declares in its constructor, and the
    reader's tokenizer if it declares `tokenizer` (mlm corrupts T5 tokens)."""
    if name not in TASKS:
        raise UserError(f"--task {name!r} is not a known task; choose one of: {', '.join(TASKS)}")
    cls = importlib.import_module(f"src.tasks.{name}").Task
    wanted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in (options or {}).items() if k in wanted}
    if "tokenizer" in wanted:
        kwargs["tokenizer"] = tokenizer
    return cls(**kwargs)
