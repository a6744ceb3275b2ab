"""What train.py and evaluate.py share: options -> distributed setup -> logging -> task, model and index."""

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from src import distributed as dist
from src.atlas import Atlas, format_passage
from src.checkpoint import Loaded, build_model, run_dir
from src.data import RawInstance, load_instances
from src.errors import UserError
from src.evaluation import EvalData, load_eval_data
from src.index import DistributedIndex, embed_passages
from src.logs import setup_logging
from src.options import parse_options
from src.passages import PassageStore
from src.retriever import PassageEmbedder
from src.tasks import Task, build_task
from src.training import seed_everything

logger = logging.getLogger(__name__)


@dataclass
class Run:
    opt: argparse.Namespace
    world: dist.World
    task: Task
    train_data: list[RawInstance]  # this rank's share of --train_data
    eval_data: list[EvalData]  # this rank's share of each --eval_data file
    loaded: Loaded
    index: DistributedIndex | None


def refresh_index(model: Atlas, index: DistributedIndex, opt: argparse.Namespace) -> None:
    """Re-embed every rank's shard with the current passage encoder (collective), then save it if asked."""
    embed_passages(
        index,
        PassageEmbedder(model.retriever),
        model.retriever_tokenizer,
        lambda passage: format_passage(opt.retriever_format, passage),
        opt.per_gpu_embedder_batch_size,
        min(opt.text_maxlength, 512),
    )
    if opt.save_index_path:
        index.save(opt.save_index_path, opt.save_index_n_shards)


def build_index(opt: argparse.Namespace, model: Atlas, world: dist.World) -> DistributedIndex | None:
    """Load --load_index_path, or build from --passages and embed; None when nothing is retrieved."""
    if opt.closed_book or opt.use_file_passages:
        return None
    index_options = dict(
        mode=opt.index_mode,
        faiss_index_type=opt.faiss_index_type,
        faiss_code_size=opt.faiss_code_size,
        faiss_nprobe=opt.faiss_nprobe,
    )
    if opt.load_index_path:
        index = DistributedIndex.load(opt.load_index_path, world, **index_options)
        index.check_dim(model.retriever.dim)
        return index
    cache = opt.passage_store_dir or str(Path(opt.checkpoint_dir) / "passage_store")
    store = PassageStore.build_or_open(opt.passages, cache, opt.max_passages, world)
    index = DistributedIndex(store, model.retriever.dim, world, **index_options)
    logger.info("embedding %d passages (%d on this rank)", len(store), len(index.local_rows))
    refresh_index(model, index, opt)
    return index


def setup(argv: list[str] | None, mode: str) -> Run:
    """Parse options, start the process group, log to {checkpoint_dir}/{name}/run.log, build task/model/index."""
    opt = parse_options(argv, mode)
    world = dist.init_distributed(opt.local_rank, opt.main_port)
    setup_logging(world.is_main, run_dir(opt) / "run.log")
    logger.info("options: %s", " ".join(sys.argv[1:] if argv is None else argv))
    seed_everything(opt.seed + world.rank)
    task = build_task(opt.task, opt)
    # Data first: a malformed line or a missing field fails in seconds, before models and the index are built.
    train_data = load_instances(opt.train_data, task, world.rank, world.world_size) if mode == "train" else []
    eval_data = load_eval_data(task, opt, world)
    loaded = build_model(opt, world.device)
    index = build_index(opt, loaded.model, world)
    return Run(opt, world, task, train_data, eval_data, loaded, index)


def main_guard(fn: Callable[[], None]) -> None:
    """Run an entry point: user mistakes end in one line on stderr and exit status 2; always tear down."""
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        dist.destroy_distributed()
