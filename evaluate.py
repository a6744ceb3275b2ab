"""Evaluate Atlas on --eval_data files (or retrieve only): `python evaluate.py --task qa --eval_data ...`."""

from src.evaluation import build_evaluate_fn
from src.run import main_guard, setup


def main(argv: list[str] | None = None) -> None:
    run = setup(argv, "evaluate")
    evaluate_fn = build_evaluate_fn(run.task, run.opt, run.world, run.eval_data)
    scores = evaluate_fn(run.loaded.model, run.index, run.loaded.step)
    if run.world.is_main:
        for name, value in scores.items():
            print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main_guard(main)
