"""Train Atlas: `python train.py --task qa --train_data ... --passages ...` (or under torchrun / srun)."""

import random

from src.data import training_batches
from src.evaluation import Evaluator
from src.run import main_guard, setup
from src.training import Trainer


def main(argv: list[str] | None = None) -> None:
    run = setup(argv, "train")
    settings, world = run.settings, run.world
    rng = random.Random(settings.seed + world.rank)
    batches = training_batches(run.train_data, run.task, settings.train.per_gpu_batch_size, settings.train.shuffle, rng)
    evaluate = Evaluator(run.task, settings.eval, run.tokenizers, world, run.eval_data) if run.eval_data else None
    trainer = Trainer(run.model, run.tokenizers, run.index, run.task, settings, world, evaluate)
    trainer.load_state(run.resume)
    trainer.train(batches, run.step)
    print(f"training done: {settings.train.total_steps} steps, checkpoints in {settings.run_dir}/checkpoint")


if __name__ == "__main__":
    main_guard(main)
