"""Process-group setup and the few collectives the project uses: the only module that calls torch.distributed.

`init_distributed` reads the launcher's environment (torchrun, then SLURM, else one plain process) and returns a
`World`. Every helper here is a no-op (or the identity) when no process group is initialised, so single-process code
runs the same code path as multi-process code.

One rule for devices: every tensor a collective sends or receives is on `communication_device()` (the current CUDA
device under NCCL, which accepts nothing else; the CPU under gloo). The helpers move payloads there and give results
back on the caller's device, so callers pass tensors from wherever they live.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from src.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, rank on its node, number of processes, and its compute device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs, writes shared files and builds caches)."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,9],cpu1`` (-> ``gpu003``).

    Uses ``scontrol show hostnames`` when available; otherwise a small parser that handles one bracket group.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as error:
            logger.warning("scontrol show hostnames failed (%s); parsing SLURM_JOB_NODELIST myself", error)
    # The first top-level item ends at the first comma outside brackets.
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if match is None or not match.group(0):
        raise UserError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: "003-005" -> "003"
    return prefix + first + suffix


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(local_rank: int = -1, main_port: int = -1) -> World:
    """Initialise torch.distributed from torchrun or SLURM, or return a single-process World without a group.

    torchrun (or ``torch.distributed.launch``) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under SLURM
    with more than one task, the master is the first host of SLURM_JOB_NODELIST and the port is ``main_port`` if
    given, else MASTER_PORT, else 29500 + SLURM_JOB_ID % 1000 (so concurrent jobs on one node rarely collide).
    Backend: NCCL with ``cuda:local_rank`` when CUDA is available, gloo with CPU otherwise.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = local_rank if local_rank >= 0 else int(env.get("LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise UserError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size, local = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID")
        if "SLURM_JOB_NODELIST" not in env:
            raise UserError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is not set: run the job through srun")
        env.setdefault("MASTER_ADDR", first_slurm_host(env["SLURM_JOB_NODELIST"]))
        if main_port > 0:
            env["MASTER_PORT"] = str(main_port)
        else:
            env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        device = _device_for(max(local_rank, 0)) if torch.cuda.is_available() else torch.device("cpu")
        logger.info("no launcher environment found: running as one process on %s", device)
        return World(rank=0, local_rank=0, world_size=1, device=device)

    device = _device_for(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local, device, backend)
    return World(rank=rank, local_rank=local, world_size=world_size, device=device)


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def destroy_distributed() -> None:
    """Tear the process group down; a no-op when none is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def end_process(status: int) -> NoReturn:
    """Exit with ``status``, after tearing the process group down. A process that had a group leaves through
    os._exit, after flushing the logs and stdio: at interpreter teardown a gloo worker thread may still be freeing the
    tensors of the last collective, and its taking the GIL then aborts the process ("terminate called without an
    active exception", exit -6; gdb: `ProcessGroupGloo::runLoop` -> `~AsyncBroadcastWork` -> `take_gil` ->
    `pthread_exit` in a noexcept destructor). Seen in 4-6 of 20 two-rank runs on a loaded 2-core machine."""
    if not is_distributed():
        sys.exit(status)
    destroy_distributed()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def is_peer_failure(error: BaseException) -> bool:
    """True for the error a collective raises when another process died (gloo: its connection closed; NCCL: a
    DistBackendError), as opposed to a fault of this process."""
    if not is_distributed() or not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return isinstance(error, dist.DistBackendError) or ("gloo" in text and ("Connection" in text or "closed" in text))


def communication_device() -> torch.device:
    """Where collective payloads live: the current CUDA device for an NCCL group, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if is_distributed():
        dist.barrier()


def all_gather_varsize(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``t`` along dim 0 (ranks may hold 0 rows); also return the row count per rank.

    all_gather needs equal shapes, so every rank pads to the largest size and the padding is trimmed.
    """
    if not is_distributed():
        return t, [t.shape[0]]
    world_size, device = dist.get_world_size(), communication_device()
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    sizes_t = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes_t, size)
    sizes = torch.cat(sizes_t).tolist()  # one transfer, not one per rank
    padded = t.new_zeros((max(sizes), *t.shape[1:]), device=device)  # (max_rows, ...)
    padded[: t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0).to(t.device), sizes


def all_to_all_rows(t: torch.Tensor, send_sizes: list[int], recv_rows_each: int) -> torch.Tensor:
    """Send rows ``t[sum(send_sizes[:j]) : sum(send_sizes[:j+1])]`` to rank j; receive ``recv_rows_each`` rows from
    every rank, concatenated in rank order. In one process this is the identity."""
    if not is_distributed():
        return t
    world_size, device = dist.get_world_size(), communication_device()
    out = torch.empty((recv_rows_each * world_size, *t.shape[1:]), dtype=t.dtype, device=device)  # (W * rows, ...)
    dist.all_to_all_single(
        out, t.to(device).contiguous(), output_split_sizes=[recv_rows_each] * world_size, input_split_sizes=send_sizes
    )
    return out.to(t.device)


def send_tensor(t: torch.Tensor, dst: int) -> None:
    """Point-to-point send (the receiver must know the shape and dtype)."""
    dist.send(t.to(communication_device()).contiguous(), dst=dst)


def recv_tensor(t: torch.Tensor, src: int) -> torch.Tensor:
    """Point-to-point receive into the preallocated ``t``; returns it."""
    buffer = torch.empty_like(t, device=communication_device())
    dist.recv(buffer, src=src)
    return t.copy_(buffer)


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place; a no-op in one process."""
    if not is_distributed():
        return
    device = communication_device()
    for t in [*module.parameters(), *module.buffers()]:
        payload = t.data.to(device)
        dist.broadcast(payload, src=0)
        if payload is not t.data:
            t.data.copy_(payload)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it; the identity in one process."""
    if is_distributed():
        payload = t.to(communication_device())
        dist.all_reduce(payload, op=dist.ReduceOp.SUM)
        if payload is not t:
            t.copy_(payload)
    return t


def all_reduce_max_int(x: int) -> int:
    """Maximum of a Python int over ranks."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.int64, device=communication_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``obj`` from rank ``src`` on every rank (pickled; only for small control messages)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None elsewhere (pickled; e.g. result rows to write)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's ``obj`` in rank order (pickled; only for small control messages)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
