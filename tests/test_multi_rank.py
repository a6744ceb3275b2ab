"""train.py and evaluate.py on 2 processes (torchrun, gloo, CPU) against 1 process, as a user launches them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, demo_args
from tests.conftest import run_script as run

pytestmark = pytest.mark.distributed
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch_until(args: list[str], env: dict, log, text: str) -> subprocess.Popen:
    """Start `torchrun train.py ARGS` on 2 ranks and return once its run.log shows `text` (it is still running)."""
    command = [sys.executable, *TORCHRUN, "train.py", *args]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (log.exists() and text in log.read_text()):
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    return launcher


def common(demo, ckpt):
    return [*demo_args(demo, ckpt), "--n_context", "2", "--retriever_n_context", "2", "--generation_max_length", "6",
            "--per_gpu_batch_size", "2"]  # fmt: skip


def test_one_training_line_trains_on_two_ranks(demo, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text((demo / "data/train.jsonl").read_text().splitlines()[0] + "\n")
    result = run([*TORCHRUN, "train.py", *common(demo, tmp_path), "--name", "one", "--train_data", str(one),
                  "--total_steps", "2", "--log_freq", "1", "--train_retriever",
                  "--query_side_retriever_training"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "1 training lines < 4 (processes x batch): each used 4 times" in result.stderr and "step 2/2" in result.stderr
    )
    assert "the retriever loss reads the passages' vectors from the index" in result.stderr  # a collective, 2 ranks


def test_two_ranks_write_the_same_rows_in_the_same_order_with_the_same_metrics(demo, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join((demo / "data/dev.jsonl").read_text().splitlines()[:7]) + "\n")  # 7: ranks differ
    args = [*common(demo, tmp_path), "--eval_data", str(dev), "--write_results"]
    outputs = {}
    for name, launcher in (("one", []), ("two", TORCHRUN)):
        result = run([*launcher, "evaluate.py", *args, "--name", name])
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
        rows = [json.loads(line) for line in (tmp_path / name / "dev-step-0.jsonl").read_text().splitlines()]
        outputs[name + "_rows"] = [(r["query"], r["generation"], [p["id"] for p in r["passages"]]) for r in rows]
    assert outputs["one_rows"] == outputs["two_rows"] and len(outputs["one_rows"]) == 7
    assert [json.loads(line)["question"] for line in dev.read_text().splitlines()] == [
        q.removeprefix("question: ").removesuffix(" answer: <extra_id_0>") for q, _, _ in outputs["one_rows"]
    ]
    metrics = [line for line in outputs["one"].splitlines() if line.startswith("dev/")]
    assert metrics and metrics == [line for line in outputs["two"].splitlines() if line.startswith("dev/")]


def test_sigusr1_to_one_rank_saves_the_same_step_on_both_exits_0_and_requeues_once(demo, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "HF_HUB_OFFLINE": "1"}
    args = [*common(demo, tmp_path), "--name", "pre", "--total_steps", "100000", "--log_freq", "1"]
    launcher = launch_until(args, env, tmp_path / "pre/run.log", "step 2/")
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)  # one rank only
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    saved = torch.load(tmp_path / "pre/checkpoint/latest/model.pth.tar", weights_only=True)
    assert 2 <= saved["step"] < 100000 and len(saved["data_positions"]) == 2
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"  # rank 0 alone
    step = saved["step"]
    resumed = run(["train.py", *args[:-4], "--total_steps", str(step + 1), "--log_freq", "1"])  # on 1 process now
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {step}" in resumed.stderr and f"step {step + 1}/{step + 1}" in resumed.stderr
    assert "data position for 1 processes" in resumed.stderr  # another world size: logged, data starts over


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint/latest/model.pth.tar", weights_only=True)["model"]


FSDP2_ON_CPU = hasattr(torch.cpu.Stream, "record_event")  # torch >= 2.7


def test_shard_grads_on_a_cpu_torch_without_fsdp2_support_is_one_line(monkeypatch):
    from src.config import TrainConfig
    from src.errors import UserError
    from src.sharding import DataParallel

    if FSDP2_ON_CPU:
        monkeypatch.delattr(torch.cpu.Stream, "record_event")
    with pytest.raises(UserError, match="--shard_grads on CPU needs torch >= 2.7"):
        DataParallel(torch.nn.Linear(2, 2), TrainConfig(shard_optim=True, shard_grads=True), world_size=2)


@pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on CPU needs torch >= 2.7")
def test_sharded_training_matches_unsharded_and_resumes_exactly(demo, tmp_path):
    """ZeRO-1 (--shard_optim) gives the unsharded run's weights bit for bit: the same AdamW arithmetic, split over
    ranks. ZeRO-2 (FSDP) agrees to float rounding: the gradient norm for clipping is summed from each rank's shard,
    in another order. A ZeRO-2 run stopped at step 2 (its resume state: one optimizer shard per rank) and rerun ends
    with the weights of the uninterrupted one; older resume states are pruned."""
    args = [*common(demo, tmp_path), "--train_retriever", "--lr_retriever", "1e-3", "--shuffle", "--save_freq", "2",
            "--scheduler_steps", "4", "--warmup_steps", "1", "--log_freq", "1", "--max_passages", "40"]  # fmt: skip
    layouts = {"replicated": [], "zero1": ["--shard_optim"], "zero2": ["--shard_optim", "--shard_grads"]}
    for name, flags in layouts.items():
        result = run([*TORCHRUN, "train.py", *args, *flags, "--name", name, "--total_steps", "4"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"data parallelism: {name} over 2 processes" in result.stderr and "loss/loss nan" not in result.stderr
    reference = _weights(tmp_path / "replicated")
    zero1, zero2 = _weights(tmp_path / "zero1"), _weights(tmp_path / "zero2")
    assert list(zero1) == list(zero2) == list(reference)  # released keys, no FSDP/DDP prefixes
    assert all(torch.equal(reference[k], zero1[k]) for k in reference)
    for k in reference:
        torch.testing.assert_close(zero2[k], reference[k], rtol=1e-5, atol=1e-6)
    checkpoints = tmp_path / "zero2/checkpoint"
    assert sorted(p.name for p in (checkpoints / "step-4/resume").iterdir()) == [
        "optimizers.rank00000-of-00002.pt", "optimizers.rank00001-of-00002.pt"]  # fmt: skip
    assert not (checkpoints / "step-2/resume").exists()  # pruned once step 4 was saved
    zero2_flags = [*args, *layouts["zero2"], "--name", "zero2-stopped"]
    for total in ("2", "4"):
        result = run([*TORCHRUN, "train.py", *zero2_flags, "--total_steps", total])
        assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 2" in result.stderr and "afresh" not in result.stderr
    resumed = _weights(tmp_path / "zero2-stopped")
    assert all(torch.equal(zero2[k], resumed[k]) for k in zero2)


def test_an_error_on_one_rank_ends_both_promptly_with_its_message(demo, tmp_path):
    """Rank 1 meets a malformed line mid-training (lines are read when used; rank 1 reads the even ones), while rank 0
    waits for it in a collective: both end within seconds, with rank 1's one-line error, and rank 0 says in one line
    that it lost its peer instead of printing a gloo traceback."""
    train = tmp_path / "train.jsonl"
    train.write_text((demo / "data/train.jsonl").read_text())
    args = [*common(demo, tmp_path), "--name", "fails", "--train_data", str(train), "--total_steps", "100000",
            "--log_freq", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launcher = launch_until(args, env, tmp_path / "fails/run.log", "step 1/")
    lines = train.read_text().splitlines(keepends=True)  # same length per line: the byte offsets stay valid
    train.write_text("".join("[" + line[1:] if i % 2 else line for i, line in enumerate(lines)))
    started = time.time()
    _, stderr = launcher.communicate(timeout=120)
    assert time.time() - started < 60 and launcher.returncode != 0
    assert f"error: {train}:" in stderr and "not valid JSON" in stderr
    # rank 0 says so in one line, unless torchrun's SIGTERM ends it first
    assert "error: rank 0: another process ended during a collective" in stderr or "(SIGTERM)" in stderr
    assert "[rank0]: Traceback" not in stderr
