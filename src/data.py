"""jsonl reading with file:line errors, sharding of instances over ranks, and batching."""

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from src.errors import UserError
from src.tasks import Example, Task

logger = logging.getLogger(__name__)


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises UserError naming file:line."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                detail = f"{err.msg} at character {err.pos + 1}"
                raise UserError(f"{path}:{line_number}: not valid JSON ({detail})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}")
            yield line_number, obj


@dataclass
class RawInstance:
    """A jsonl object and where it came from; the task turns it into an Example each time it is read."""

    obj: dict
    where: str  # "file:line"


def load_instances(paths: list[str], task: Task, rank: int = 0, world_size: int = 1) -> list[RawInstance]:
    """This rank's share (every world_size-th line, counted over all files) of the instances in `paths`.

    Every instance is processed once here so that a missing field fails at start-up, not hours into a run.
    """
    instances = []
    check_rng = random.Random(0)
    for path in paths:
        for line_number, obj in read_jsonl(path):
            where = f"{path}:{line_number}"
            if task.process(obj, where, check_rng) is None:
                continue
            instances.append(RawInstance(obj, where))
    return instances[rank::world_size]


def process(instances: list[RawInstance], task: Task, rng: random.Random) -> list[Example]:
    """Examples of the given instances, dropping those the task rejects."""
    examples = (task.process(inst.obj, inst.where, rng) for inst in instances)
    return [ex for ex in examples if ex is not None]


def training_batches(
    instances: list[RawInstance], task: Task, batch_size: int, shuffle: bool, rng: random.Random
) -> Iterator[list[Example]]:
    """Endless full batches: epochs over the instances, reshuffled each epoch when `shuffle`.

    A shard smaller than the batch is cycled, so every rank always yields a batch (the original hung there).
    """
    if not instances:
        raise UserError("the training data has no usable instance for this process (check --train_data)")
    buffer: list[Example] = []
    while True:
        order = list(instances)
        if shuffle:
            rng.shuffle(order)
        for example in process(order, task, rng):
            buffer.append(example)
            if len(buffer) == batch_size:
                yield buffer
                buffer = []


def eval_batches(instances: list[RawInstance], task: Task, batch_size: int) -> list[list[Example]]:
    """The examples of one rank in order, in batches (the last one may be short)."""
    examples = process(instances, task, random.Random(0))
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
