"""Every example script's train.py / evaluate.py command runs to its first step, with tiny models and data swapped in.

The launchers are stubbed (tests/test_preprocessing.py's `stub_env`): each script's command is captured, its model,
data, index and output paths are replaced by the tiny demo world's, --total_steps becomes 1, and the command is run
in one process. Every other flag stays as the script has it (shapes, precision, sharding, task options).
"""

import json
from pathlib import Path

import pytest

from tests.conftest import demo_args
from tests.conftest import run_script as run
from tests.test_preprocessing import SCRIPTS, stub_env  # noqa: F401  (stub_env is a fixture)
from tests.test_preprocessing import run_script as captured_command

MMLU_ROWS = [
    {"question": "What is 2 + 2?", "options": {"A": "3", "B": "4", "C": "5", "D": "6"}, "answer": "B",
     "dataset": "elementary_mathematics"},
    {"question": "Which is a colour?", "options": {"A": "red", "B": "dog", "C": "run", "D": "six"}, "answer": "A",
     "dataset": "miscellaneous"},
]  # fmt: skip


def swap(args: list[str], values: dict[str, list[str]]) -> list[str]:
    """`args` with the values of each flag in `values` replaced (a flag's values run to the next --flag)."""
    out, skipping = [], False
    for arg in args:
        if arg.startswith("--"):
            skipping = arg[2:] in values
            out += [arg, *values[arg[2:]]] if skipping else [arg]
        elif not skipping:
            out.append(arg)
    return out


@pytest.fixture(scope="module")
def tiny(demo, tmp_path_factory) -> dict[str, Path]:
    """Small files in each task's format, a checkpoint and a saved index of the demo world."""
    root = tmp_path_factory.mktemp("tiny")
    rows = (demo / "data/train.jsonl").read_text().splitlines()
    passages = (demo / "data/passages.jsonl").read_text().splitlines()
    files = {"qa": rows[:6], "multiple_choice": [json.dumps(r) for r in MMLU_ROWS * 3], "corpus": passages[:6]}
    paths = {}
    for name, lines in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    result = run(["train.py", *demo_args(demo, root), "--name", "base", "--total_steps", "1", "--n_context", "2",
                  "--save_index_path", str(root / "index")])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    paths["checkpoint"], paths["index"] = root / "base/checkpoint/latest", root / "index"
    return paths


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_script_runs_to_its_first_step(script, stub_env, demo, tiny, tmp_path):  # noqa: F811
    argv = captured_command(script, stub_env, tmp_path)
    at = next(i for i, a in enumerate(argv) if a in ("train.py", "evaluate.py"))
    entry, args = argv[at], argv[at + 1 :]
    task = args[args.index("--task") + 1]
    data = str(tiny["corpus" if task in ("mlm", "lm", "section") else task if task == "multiple_choice" else "qa"])
    values = {
        "reader_model_type": [str(demo / "models/reader")],
        "retriever_model_path": [str(demo / "models/retriever")],
        "passages": [str(demo / "data/passages.jsonl")],
        "load_index_path": [str(tiny["index"])],
        "save_index_path": [str(tmp_path / "saved_index")],
        "train_data": [data],
        "eval_data": [data],
        "checkpoint_dir": [str(tmp_path / "runs")],
        "total_steps": ["1"],
    }
    if "--model_path" in args and args[args.index("--model_path") + 1] != "none":
        values["model_path"] = [str(tiny["checkpoint"])]
    args = swap(args, values)
    if "--retriever_model_path" not in args:  # the scripts use the default Contriever
        args += ["--retriever_model_path", str(demo / "models/retriever")]
    result = run([entry, *args])
    assert result.returncode == 0, f"{script.name}: {' '.join(args)}\n{result.stderr[-3000:]}"
    if entry == "train.py":
        assert "step 1/1" in result.stderr and "training done" in result.stdout
    else:
        assert ("recall@" if "--retrieve_only" in args else "/") in result.stdout


def test_the_demo_script_runs_its_recipe_and_exits_0(tmp_path):
    # The README's demo command, with a few steps of each stage: every stage runs, the result line is printed and the
    # script exits 0 (its clean-up of the background baseline used to turn success into exit status 1).
    import os
    import subprocess

    env = {**os.environ, "DEMO_PRETRAIN_STEPS": "2", "DEMO_STEPS": "4", "DEMO_RETRIEVER_AT": "3",
           "DEMO_RETRIEVER_STEPS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", "example_scripts/demo/run.sh", str(tmp_path / "demo")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("demo: closed-book EM ")
