"""One rule for collectives: every payload is on the communication device (NCCL takes CUDA tensors only).

NCCL cannot run here, so a pretend group reports `meta` as its communication device and every torch.distributed
collective is replaced by a check: a collective handed a tensor anywhere else fails the test, as NCCL would fail.
"""

import ast
from pathlib import Path

import pytest
import torch

from src import distributed, evaluation

SRC = Path(__file__).resolve().parents[1] / "src"
COLLECTIVES = ("all_reduce", "all_gather", "all_to_all_single", "send", "recv", "broadcast", "reduce_scatter_tensor")


class Reached(Exception):
    """The collective was called with every tensor on the communication device."""


@pytest.fixture
def pretend_group(monkeypatch):
    comm = torch.device("meta")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "communication_device", lambda: comm)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda *args, **kwargs: 2)

    def checked(name):
        def collective(*args, **kwargs):
            for arg in [*args, *kwargs.values()]:
                for t in arg if isinstance(arg, list) else [arg]:
                    if isinstance(t, torch.Tensor):
                        assert t.device == comm, f"{name} was given a tensor on {t.device}, not on {comm}"
            raise Reached(name)

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(distributed.dist, name, checked(name))


CALLS = {
    "all_reduce_sum": lambda: distributed.all_reduce_sum(torch.ones(3)),
    "all_reduce_max_int": lambda: distributed.all_reduce_max_int(4),
    "all_gather_varsize": lambda: distributed.all_gather_varsize(torch.ones(2, 3)),
    "all_to_all_rows": lambda: distributed.all_to_all_rows(torch.ones(4, 3), [2, 2], 2),
    "send_tensor": lambda: distributed.send_tensor(torch.ones(2), 1),
    "recv_tensor": lambda: distributed.recv_tensor(torch.ones(2), 1),
    "evaluation.reduce_means": lambda: evaluation.reduce_means({"exact_match": 50.0}, {"exact_match": 1.0}),
    "evaluation.padded_batches": lambda: evaluation.padded_batches([[]]),
}


@pytest.mark.parametrize("name", CALLS)
def test_collective_payloads_are_on_the_communication_device(pretend_group, name):
    with pytest.raises(Reached):
        CALLS[name]()


def test_communication_device_follows_the_backend(monkeypatch):
    assert distributed.communication_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.communication_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *args: "gloo")
    assert distributed.communication_device() == torch.device("cpu")


# Modules allowed to import torch.distributed (or a submodule), and why.
ALLOWED = {
    "distributed.py": "the project's own collectives: payloads on the communication device",
    "sharding.py": "torch's own wrappers (DDP, FSDP2, ZeroRedundancyOptimizer, DTensor) place their own payloads",
}


def test_only_distributed_py_calls_torch_distributed():
    """The rule lives in one place: no other module of src/ imports torch.distributed or its submodules."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            names = [n for n in names if n.split(".")[:2] == ["torch", "distributed"]]
            offenders += [f"{path.relative_to(SRC)}: {n}" for n in names]
    assert not offenders
