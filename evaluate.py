"""Evaluate Atlas on --eval_data files (or retrieve only): `python evaluate.py --task qa --eval_data ...`."""

from src.evaluation import Evaluator
from src.run import main_guard, setup


def main(argv: list[str] | None = None) -> None:
    run = setup(argv, "evaluate")
    evaluate = Evaluator(run.task, run.settings.eval, run.tokenizers, run.world, run.eval_data)
    scores = evaluate(run.model, run.index, run.step)
    if run.world.is_main:
        for name, value in scores.items():
            print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main_guard(main)
