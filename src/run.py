"""What train.py and evaluate.py share: settings -> distributed setup -> logging -> data, model and index."""

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from src import distributed as dist
from src.atlas import Atlas
from src.batching import Tokenizers
from src.checkpoint import read_checkpoint, resume_state
from src.config import Settings
from src.data import TrainingData
from src.errors import UserError
from src.evaluation import EvalData, load_eval_data
from src.index import DistributedIndex
from src.index.refresh import build_index
from src.logs import setup_logging
from src.model_factory import build_model, load_tokenizers, record_layernorm
from src.options import parse_settings
from src.tasks import Task, build_task
from src.training import seed_everything

logger = logging.getLogger(__name__)


@dataclass
class Run:
    settings: Settings
    world: dist.World
    task: Task
    train_data: TrainingData | None  # this rank's share of --train_data (train.py)
    eval_data: list[EvalData]  # this rank's share of each --eval_data file
    model: Atlas
    tokenizers: Tokenizers
    index: DistributedIndex | None
    step: int = 0  # the step training resumes after (0: a new run)
    resume: dict | None = None  # the resumed checkpoint (optimizer and scheduler states)


def setup(argv: list[str] | None, mode: str) -> Run:
    """Parse flags, start the process group, log to {checkpoint_dir}/{name}/run.log, build task/model/index."""
    settings = parse_settings(argv, mode)
    world = dist.init_distributed(settings.local_rank, settings.main_port)
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(world.is_main, settings.run_dir / "run.log")
    except OSError as err:
        raise UserError(f"--checkpoint_dir: cannot write {settings.run_dir} ({err.strerror or err})") from None
    logger.info("options: %s", " ".join(sys.argv[1:] if argv is None else argv))
    seed_everything(settings.seed + world.rank)
    tokenizers = load_tokenizers(settings.model)
    task = build_task(settings.task, settings.options, tokenizers.reader)
    # Data first: a malformed line or a missing field fails in seconds, before models and the index are built.
    train_data = None
    if mode == "train":  # a few-shot file with fewer lines than processes x batch is repeated: every rank trains
        repeat_below = world.world_size * settings.train.per_gpu_batch_size
        train_data = TrainingData(list(settings.train_data), task, world.rank, world.world_size, repeat_below)
    eval_data = load_eval_data(task, settings.eval, world)
    # A training run's own latest checkpoint wins over --model_path (a rerun after preemption resumes; the original
    # resumed only with --model_path none); evaluation reads it only when no --model_path is given.
    resume = None
    if mode == "train" or settings.model.model_path is None:
        resume = resume_state(settings.run_dir, settings.options)
    if resume and settings.model.model_path:
        logger.info("%s/checkpoint/latest wins over --model_path %s", settings.run_dir, settings.model.model_path)
    source = resume or (read_checkpoint(settings.model.model_path) if settings.model.model_path else None)
    model, tokenizers = build_model(settings.model, settings.atlas, world.device, source, tokenizers)
    settings = record_layernorm(settings, model)  # checkpoints then record the variant `auto` resolved to
    index = build_index(settings.index, model, tokenizers, world, (resume or {}).get("index_passage_encoder"))
    step = int(resume["step"]) if resume else 0
    return Run(settings, world, task, train_data, eval_data, model, tokenizers, index, step, resume)


def main_guard(fn: Callable[[], None]) -> None:
    """Run an entry point: user mistakes end in one line on stderr and exit status 2; always tear down (see
    `distributed.end_process`)."""
    status = 0
    try:
        try:
            fn()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
        except RuntimeError as err:
            if not dist.is_peer_failure(err):
                raise
            # Another process failed (its own message says why) and this one's collective lost its connection: one
            # line, not a traceback that would bury that message.
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" This is typically")[0]
            print(f"error: rank {dist.rank()}: another process ended during a collective ({first})", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            status = 130
    except BaseException:
        dist.destroy_distributed()
        raise
    dist.end_process(status)
