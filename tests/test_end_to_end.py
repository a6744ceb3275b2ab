"""train.py and evaluate.py run end to end on a tiny offline demo world, as a user would call them."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_args
from tests.conftest import run_script as run


def common(demo: Path, ckpt: Path) -> list[str]:
    flags = ["--target_maxlength", "16", "--generation_max_length", "8"]
    flags += ["--n_context", "2", "--retriever_n_context", "3"]
    return [*demo_args(demo, ckpt), *flags]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("runs")
    args = common(demo, ckpt) + [
        "--name", "tiny", "--eval_data", str(demo / "data/dev.jsonl"),
        "--train_retriever", "--total_steps", "3", "--eval_freq", "3", "--log_freq", "1", "--warmup_steps", "1",
        "--per_gpu_batch_size", "2", "--save_optimizer",
    ]  # fmt: skip
    result = run(["train.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


def test_train_writes_log_events_and_checkpoint(trained):
    run_dir = trained / "tiny"
    assert (run_dir / "run.log").read_text().count("step 3/3") >= 1
    assert list(run_dir.glob("events.out.tfevents*"))
    ckpt = torch.load(run_dir / "checkpoint/latest/model.pth.tar", weights_only=True)
    assert ckpt["step"] == 3 and isinstance(ckpt["opt"], dict) and ckpt["optimizer"] is not None
    assert any(k.startswith("reader.encoder.") for k in ckpt["model"])
    assert any(k.startswith("retriever.contriever.") for k in ckpt["model"])


def test_evaluate_writes_results(demo, trained):
    args = common(demo, trained) + [
        "--name", "tiny-eval", "--model_path", str(trained / "tiny/checkpoint/latest"),
        "--eval_data", str(demo / "data/dev.jsonl"), "--write_results", "--per_gpu_batch_size", "3",
    ]  # fmt: skip
    result = run(["evaluate.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dev/exact_match:" in result.stdout
    rows = [json.loads(line) for line in (trained / "tiny-eval/dev-step-0.jsonl").read_text().splitlines()]
    n_dev = len((demo / "data/dev.jsonl").read_text().splitlines())
    assert len(rows) == n_dev
    assert {"query", "answers", "generation", "passages", "metadata"} <= set(rows[0])
    assert len(rows[0]["passages"]) == 2


def test_retrieve_only_reports_recall_and_writes_scores(demo, trained):
    args = common(demo, trained) + [
        "--name", "tiny-retrieve", "--eval_data", str(demo / "data/dev.jsonl"), "--retrieve_only",
        "--write_results", "--n_context", "5", "--retriever_n_context", "5",
    ]  # fmt: skip
    result = run(["evaluate.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dev/recall@5:" in result.stdout and "dev/gold_recall@1:" in result.stdout
    row = json.loads((trained / "tiny-retrieve/dev-step-0.jsonl").read_text().splitlines()[0])
    assert "generation" not in row and len(row["passages"]) == 5
    scores = [p["score"] for p in row["passages"]]
    assert scores == sorted(scores, reverse=True) and all("id" in p for p in row["passages"])


def test_mlm_retrieve_only_masks_its_queries_with_the_reader_tokenizer(demo, trained):
    # --retrieve_only loads no reader, but the mlm task cuts its inputs with the reader's tokenizer: it is loaded.
    args = common(demo, trained) + [
        "--name", "mlm-retrieve", "--task", "mlm", "--eval_data", str(demo / "data/pretrain.jsonl"),
        "--retrieve_only", "--write_results",
    ]  # fmt: skip
    result = run(["evaluate.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrain/recall@1:" in result.stdout
    row = json.loads((trained / "mlm-retrieve/pretrain-step-0.jsonl").read_text().splitlines()[0])
    assert "<extra_id_0>" in row["query"] and len(row["passages"]) == 2


def test_user_mistakes_end_in_one_line(demo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{"question": \n')
    args = common(demo, tmp_path) + ["--name", "bad", "--eval_data", str(bad)]
    result = run(["evaluate.py", *args])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}:2: not valid JSON (Expecting value at character 15)"
    assert "Traceback" not in result.stderr
    bad.write_text('{"answers": ["a"]}\n')
    result = run(["evaluate.py", *args])
    assert result.returncode == 2 and "task 'qa' needs the field 'question'" in result.stderr
    result = run(["evaluate.py", *common(demo, tmp_path), "--task", "nope"])
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_eval_files_with_the_same_name_keep_their_own_metrics_and_results(demo, trained, tmp_path):
    rows = (demo / "data/dev.jsonl").read_text().splitlines()
    for name, part in (("a", rows[:3]), ("b", rows[3:8])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev.jsonl").write_text("\n".join(part) + "\n")
    args = common(demo, trained) + [
        "--name", "same-stem", "--model_path", str(trained / "tiny/checkpoint/latest"), "--write_results",
        "--eval_data", str(tmp_path / "a/dev.jsonl"), str(tmp_path / "b/dev.jsonl"),
    ]  # fmt: skip
    result = run(["evaluate.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a-dev/exact_match:" in result.stdout and "b-dev/exact_match:" in result.stdout
    assert len((trained / "same-stem/a-dev-step-0.jsonl").read_text().splitlines()) == 3
    assert len((trained / "same-stem/b-dev-step-0.jsonl").read_text().splitlines()) == 5


def test_checkpoint_of_other_shapes_and_unwritable_checkpoint_dir_are_one_line(demo, trained, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    wider = tmp_path / "wider_reader"
    config = T5Config.from_pretrained(demo / "models/reader")
    config.d_model *= 2
    T5ForConditionalGeneration(config).save_pretrained(wider)
    for tokenizer_file in (demo / "models/reader").glob("*token*"):
        (wider / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    (wider / "spiece.model").write_bytes((demo / "models/reader/spiece.model").read_bytes())
    args = common(demo, trained) + ["--name", "wider", "--model_path", str(trained / "tiny/checkpoint/latest")]
    result = run(["evaluate.py", *args, "--eval_data", str(demo / "data/dev.jsonl"), "--reader_model_type", str(wider)])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "in the checkpoint but" in last and f"{config.d_model}" in last and "differ in shape" in last
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run(["evaluate.py", *common(demo, blocker), "--eval_data", str(demo / "data/dev.jsonl")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --checkpoint_dir: cannot write {blocker}")


@pytest.mark.parametrize("retriever", [[], ["--train_retriever", "--lr_retriever", "1e-3"]], ids=["reader", "full"])
def test_a_killed_run_resumes_bit_identically(demo, tmp_path, retriever):
    """Stopped after step 2's checkpoint and rerun: the same weights as a run that was never interrupted, without
    --save_optimizer (the optimizers come from the latest step's resume state, not from model.pth.tar). Dropout is on
    (random states restored) and, with full retriever training, the passage encoder moves while the index stays as
    embedded at step 0: the resumed run must search that index, not one embedded with its resumed weights.

    The stop is a run with --total_steps 2 (the same schedule: --scheduler_steps 4), rerun with 4: a kill after
    step 2's save leaves the same files, deterministically."""
    args = common(demo, tmp_path) + [
        "--save_freq", "2", "--log_freq", "1", "--warmup_steps", "1", "--per_gpu_batch_size", "2", "--shuffle",
        "--dropout", "0.1", "--max_passages", "40", "--scheduler_steps", "4", *retriever,
    ]  # fmt: skip
    result = run(["train.py", *args, "--name", "whole", "--total_steps", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(["train.py", *args, "--name", "killed", "--total_steps", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "killed/checkpoint"
    saved = torch.load(checkpoints / "step-2/model.pth.tar", weights_only=True)
    assert saved["data_positions"] == [{"epoch": 0, "index": 4, "taken": 0}]
    assert saved["optimizer"] is None and saved["retr_optimizer"] is None  # no --save_optimizer
    assert (checkpoints / "step-2/resume/optimizers.pt").is_file()
    result = run(["train.py", *args, "--name", "killed", "--total_steps", "4"])
    assert result.returncode == 0 and "resuming" in result.stderr, result.stderr[-3000:]
    assert "afresh" not in result.stderr
    assert not (checkpoints / "step-2/resume").exists() and (checkpoints / "step-4/resume").is_dir()  # pruned
    whole = torch.load(tmp_path / "whole/checkpoint/latest/model.pth.tar", weights_only=True)["model"]
    resumed = torch.load(checkpoints / "latest/model.pth.tar", weights_only=True)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.cuda
@pytest.mark.parametrize("precision,kernels", [("bf16", []), ("fp16", []), ("bf16", ["--compile"]),
                                               ("bf16", ["--compile", "--reader_attention", "eager"])])  # fmt: skip
def test_single_gpu_training_and_evaluation(demo, tmp_path, precision, kernels):
    """On one GPU, train.py (retriever training included) and evaluate.py run under --precision with finite losses,
    also with the encoders compiled."""
    args = common(demo, tmp_path) + ["--precision", precision, "--per_gpu_batch_size", "2", *kernels]
    trained = run(["train.py", *args, "--name", "gpu", "--train_retriever", "--total_steps", "4", "--log_freq", "1"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = (tmp_path / "gpu" / "run.log").read_text()
    losses = [float(line.split("loss/loss ")[1].split()[0]) for line in log.splitlines() if "loss/loss " in line]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    evaluated = run(["evaluate.py", *args, "--name", "gpu_eval", "--eval_data", str(demo / "data/dev.jsonl"),
                     "--model_path", str(tmp_path / "gpu/checkpoint/latest")])  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "questions/s" in (tmp_path / "gpu_eval" / "run.log").read_text()
