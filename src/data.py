"""jsonl reading with file:line errors, sharding of instances over ranks, and batching.

Training files may be corpus-sized (mlm, lm and section train on the passage corpus itself): `TrainingData` keeps
only the byte offsets of this rank's lines (8 bytes a line) and reads an instance when it is needed, and
`TrainingBatches` walks them epoch after epoch from a position (epoch, index) that can be saved and resumed.
Evaluation files are read whole (`load_instances`).
"""

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.errors import UserError
from src.tasks import Example, Task

logger = logging.getLogger(__name__)

CHECK_LINES = 10_000  # lines of each training file processed at start-up; the rest is checked as it is read


def parse_line(line: bytes, where: str) -> dict | None:
    """The JSON object of one jsonl line (None for a blank line); UserError naming `where` (file:line) if bad."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1})") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at character {err.pos + 1})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _open(path: str):
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises UserError naming file:line."""
    with _open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            obj = parse_line(line, f"{path}:{line_number}")
            if obj is not None:
                yield line_number, obj


@dataclass
class RawInstance:
    """A jsonl object and where it came from; the task turns it into an Example each time it is read."""

    obj: dict
    where: str  # "file:line"


def load_instances(paths: list[str], task: Task, rank: int = 0, world_size: int = 1) -> list[RawInstance]:
    """This rank's share (every world_size-th usable instance, counted over all files) of the instances in `paths`.

    Every instance is processed once here so that a missing field fails at start-up, not hours into a run. A file
    without any usable instance is an error (every rank sees the same files, so every rank raises).
    """
    instances = []
    check_rng = random.Random(0)
    for path in paths:
        before = len(instances)
        for line_number, obj in read_jsonl(path):
            where = f"{path}:{line_number}"
            if task.process(obj, where, check_rng) is None:
                continue
            instances.append(RawInstance(obj, where))
        if len(instances) == before:
            raise UserError(f"{path}: no usable instance for task '{task.name}' (the file is empty or all filtered)")
    return instances[rank::world_size]


class TrainingData(Sequence):
    """This rank's share of the training files' lines (every world_size-th non-blank line over all files), read
    lazily by byte offset. The first CHECK_LINES lines of each file are processed at start-up.

    Few-shot files with fewer lines than `repeat_below` (ranks x batch size) are repeated, as the original did, so
    that every rank has instances to train on.
    """

    def __init__(self, paths: list[str], task: Task, rank: int = 0, world_size: int = 1, repeat_below: int = 0) -> None:
        self.paths, self.task = list(paths), task
        offsets, files, lines = [], [], []
        every: list[tuple[int, int, int]] = []  # all ranks' lines while the files may be small enough to repeat
        counter, check_rng = 0, random.Random(0)
        for file_id, path in enumerate(self.paths):
            usable, offset, line_number = 0, 0, 0
            with _open(path) as handle:
                for line_number, line in enumerate(handle, start=1):
                    start, offset = offset, offset + len(line)
                    if line_number <= CHECK_LINES:
                        obj = parse_line(line, f"{path}:{line_number}")
                        if obj is None:
                            continue
                        usable += task.process(obj, f"{path}:{line_number}", check_rng) is not None
                    elif not line.strip():
                        continue
                    if counter % world_size == rank:
                        offsets.append(start)
                        files.append(file_id)
                        lines.append(line_number)
                    if counter < repeat_below:
                        every.append((start, file_id, line_number))
                    counter += 1
            if usable == 0 and line_number <= CHECK_LINES:
                raise UserError(
                    f"{path}: no usable instance for task '{task.name}' (the file is empty or all filtered)"
                )
        if 0 < counter < repeat_below:
            copies = -(-repeat_below // counter)  # ceil
            logger.info("%d training lines < %d (processes x batch): each used %d times", counter, repeat_below, copies)
            offsets, files, lines = (list(x) for x in zip(*(every * copies)[rank::world_size]))
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.files = np.asarray(files, dtype=np.int32)
        self.lines = np.asarray(lines, dtype=np.int64)
        if len(self) == 0:
            raise UserError("the training data has no usable instance for this process (check --train_data)")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path = self.paths[self.files[i]]
        with open(path, "rb") as handle:
            handle.seek(int(self.offsets[i]))
            line = handle.readline()
        where = f"{path}:{int(self.lines[i])}"
        return RawInstance(parse_line(line, where), where)


@dataclass
class DataPosition:
    """Where training is in its data: the epoch, how many instances of it were read, and how many examples of the
    last one's expansion (answer-order permutations) were used."""

    epoch: int = 0
    index: int = 0
    taken: int = 0


class TrainingBatches(Iterator[list[Example]]):
    """Endless full batches of examples: epochs over the instances, in a new order each epoch when `shuffle`.

    The order of epoch e and every random choice a task makes for instance i of it depend only on (seed, e, i), so
    batches continue identically from a saved `position`. A shard smaller than the batch is cycled, so every rank
    always yields a batch (the original hung there).
    """

    def __init__(
        self,
        instances: Sequence[RawInstance],
        task: Task,
        batch_size: int,
        shuffle: bool,
        seed: int,
        position: DataPosition | None = None,
    ) -> None:
        if len(instances) == 0:
            raise UserError("the training data has no usable instance for this process (check --train_data)")
        self.instances, self.task, self.batch_size, self.shuffle, self.seed = instances, task, batch_size, shuffle, seed
        self.position = position or DataPosition()
        self._order = self._epoch_order(self.position.epoch)
        self._pending: list[Example] = []
        if self.position.taken:  # resume inside an instance's expansion: rebuild it, skip what was used
            taken = self.position.taken
            self.position.index -= 1
            self._pending = self._next_examples()[taken:]
            self.position.taken = taken

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.instances)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _next_examples(self) -> list[Example]:
        """The examples of the next instance (none if the task drops it)."""
        pos = self.position
        if pos.index == len(self._order):
            pos.epoch, pos.index = pos.epoch + 1, 0
            self._order = self._epoch_order(pos.epoch)
        instance = self.instances[int(self._order[pos.index])]
        rng = random.Random(f"{self.seed}-{pos.epoch}-{pos.index}")
        pos.index, pos.taken = pos.index + 1, 0
        example = self.task.process(instance.obj, instance.where, rng)
        return [] if example is None else self.task.expand(example, True, rng)

    def __next__(self) -> list[Example]:
        batch: list[Example] = []
        dropped = 0
        while len(batch) < self.batch_size:
            if not self._pending:
                self._pending = self._next_examples()
                dropped = 0 if self._pending else dropped + 1
                if dropped > len(self.instances):
                    raise UserError("the training data has no usable instance for this process (check --train_data)")
                continue
            take = self._pending[: self.batch_size - len(batch)]
            self._pending = self._pending[len(take) :]
            self.position.taken = self.position.taken + len(take) if self._pending else 0  # 0: instance used up
            batch += take
        return batch


def eval_batches(instances: list[RawInstance], task: Task, batch_size: int) -> list[list[Example]]:
    """The examples of one rank in order (each instance expanded by the task), in batches (the last may be short)."""
    rng = random.Random(0)
    examples = []
    for inst in instances:
        example = task.process(inst.obj, inst.where, rng)
        if example is not None:
            examples += task.expand(example, False, rng)
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
