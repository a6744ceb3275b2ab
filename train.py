"""Train Atlas: `python train.py --task qa --train_data ... --passages ...` (or under torchrun / srun)."""

import random

from src.data import training_batches
from src.evaluation import build_evaluate_fn
from src.run import main_guard, refresh_index, setup
from src.training import Trainer


def main(argv: list[str] | None = None) -> None:
    run = setup(argv, "train")
    opt, world = run.opt, run.world
    rng = random.Random(opt.seed + world.rank)
    batches = training_batches(run.train_data, run.task, opt.per_gpu_batch_size, opt.shuffle, rng)
    evaluate_fn = build_evaluate_fn(run.task, opt, world, run.eval_data) if opt.eval_data else None
    trainer = Trainer(run.loaded.model, run.index, run.task, opt, world, evaluate_fn)
    trainer.load_state(run.loaded.state)
    trainer.train(batches, run.loaded.step, lambda model, index: refresh_index(model, index, opt))
    print(f"training done: {opt.total_steps} steps, checkpoints in {opt.checkpoint_dir}/{opt.name}/checkpoint")


if __name__ == "__main__":
    main_guard(main)
