"""Train Atlas: `python train.py --task qa --train_data ... --passages ...` (or under torchrun / srun)."""

from src.checkpoint import data_position
from src.data import TrainingBatches
from src.evaluation import Evaluator
from src.run import main_guard, setup
from src.training import Trainer, requeue_slurm_job


def main(argv: list[str] | None = None) -> None:
    run = setup(argv, "train")
    settings, world = run.settings, run.world
    train = settings.train
    position = data_position(run.resume, world.rank, world.world_size)  # resumed: continue the data there
    seed = settings.seed + world.rank
    batches = TrainingBatches(run.train_data, run.task, train.per_gpu_batch_size, train.shuffle, seed, position)
    evaluate = Evaluator(run.task, settings.eval, run.tokenizers, world, run.eval_data) if run.eval_data else None
    trainer = Trainer(run.model, run.tokenizers, run.index, run.task, settings, world, evaluate)
    trainer.load_state(run.resume)
    if not trainer.train(batches, run.step):  # preempted: the state is saved; rerunning the command resumes
        if world.is_main:
            requeue_slurm_job()
            print(f"stopped by a signal: resume state saved in {settings.run_dir}/checkpoint")
        return
    if world.is_main:
        print(f"training done: {train.total_steps} steps, checkpoints in {settings.run_dir}/checkpoint")


if __name__ == "__main__":
    main_guard(main)
