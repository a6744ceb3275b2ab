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


def common(demo, ckpt):
    return [*demo_args(demo, ckpt), "--n_context", "2", "--retriever_n_context", "2", "--generation_max_length", "6",
            "--per_gpu_batch_size", "2"]  # fmt: skip


def test_one_training_line_trains_on_two_ranks(demo, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text((demo / "data/train.jsonl").read_text().splitlines()[0] + "\n")
    result = run([*TORCHRUN, "train.py", *common(demo, tmp_path), "--name", "one", "--train_data", str(one),
                  "--total_steps", "2", "--log_freq", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "1 training lines < 4 (processes x batch): each used 4 times" in result.stderr and "step 2/2" in result.stderr
    )


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
    command = [sys.executable, *TORCHRUN, "train.py", *args]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "pre/run.log"
    deadline = time.time() + 300
    while not (log.exists() and "step 2/" in log.read_text()):
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
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
