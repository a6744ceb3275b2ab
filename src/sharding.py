"""Data parallelism for training: how gradients and optimizer states are synchronised and sharded over processes.

- 1 process (`single`): nothing is wrapped; the model trains exactly as it does alone.
- W processes (`replicated`): DistributedDataParallel all-reduces the gradients bucket by bucket while backward is
  still running (the buckets are the gradients' own storage: no extra copy).
- `--shard_optim` (`zero1`): the same, and ZeroRedundancyOptimizer keeps and updates 1/W of the AdamW state on each
  process, then broadcasts the updated weights (ZeRO-1).
- `--shard_optim --shard_grads` (`zero2`): FSDP2 (`fully_shard`, reshard_after_forward=False) on every transformer
  layer: a layer's gradients are reduce-scattered as soon as its backward is done, so each process keeps 1/W of the
  gradients and of the AdamW state (ZeRO-2), and between steps 1/W of the weights too (they are gathered whole for a
  step: retrieval, index refresh and evaluation use the model outside its training forward).

With this module, src/distributed.py is the only place that imports torch.distributed; here only torch's own wrappers
(DDP, FSDP2, ZeroRedundancyOptimizer, DTensor), which put their collectives' payloads on the right device themselves.
"""

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from src import distributed as dist
from src.config import TrainConfig
from src.errors import UserError

logger = logging.getLogger(__name__)

LAYOUTS = ("single", "replicated", "zero1", "zero2")


def layout_for(cfg: TrainConfig, world_size: int) -> str:
    """Which of LAYOUTS a run trains with (the flags only matter with more than one process)."""
    if world_size == 1:
        return "single"
    if cfg.shard_grads:
        return "zero2"
    return "zero1" if cfg.shard_optim else "replicated"


def transformer_layers(module: nn.Module) -> Iterator[nn.Module]:
    """The items of the outermost ModuleLists (T5 blocks, BERT layers): FSDP's units, so that each layer's gradients
    are reduce-scattered as soon as its backward is done. Embeddings and final norms stay with the root unit."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from transformer_layers(child)


def _full(t: torch.Tensor) -> torch.Tensor:
    """COLLECTIVE for a DTensor: the whole tensor on every rank (a plain tensor is returned as is)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class DataParallel:
    """The model as it trains on this process: `forward_module` runs the training forward; `model` is the Atlas itself
    (sharded in place under zero2), used for everything else inside `gathered()`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, world_size: int) -> None:
        self.model, self.layout = model, layout_for(cfg, world_size)
        on_cpu = next(model.parameters()).device.type == "cpu"
        if self.layout == "zero2" and on_cpu and not hasattr(torch.cpu.Stream, "record_event"):
            raise UserError(
                f"--shard_grads on CPU needs torch >= 2.7 (FSDP2's CPU streams); this is {torch.__version__}"
            )
        self.forward_module: nn.Module = model
        if self.layout in ("replicated", "zero1"):
            # find_unused_parameters: a frozen retriever (--freeze_retriever_steps, or reader-only training) and BERT's
            # pooler get no gradient, and DDP must not wait for them.
            self.forward_module = DistributedDataParallel(
                model, find_unused_parameters=True, gradient_as_bucket_view=True
            )
        elif self.layout == "zero2":
            dist.broadcast_module(model)  # every rank keeps its slice of rank 0's weights (DDP does this itself)
            for layer in transformer_layers(model):
                fully_shard(layer, reshard_after_forward=False)
            fully_shard(model, reshard_after_forward=False)
            # FSDP takes the first unit that runs forward for the root; retrieval runs BERT layers before any
            # Atlas.forward, so settle the root now.
            fully_shard.state(model)._lazy_init()
        logger.info("data parallelism: %s over %d processes", self.layout, world_size)

    @property
    def shards_optimizer(self) -> bool:
        """True when each process holds a different part of the optimizer state."""
        return self.layout in ("zero1", "zero2")

    def _units(self) -> list[FSDPModule]:
        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    def unshard(self) -> None:
        """COLLECTIVE under zero2: gather the whole weights (before retrieval; backward shards them again)."""
        for unit in self._units():
            unit.unshard()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """COLLECTIVE under zero2: the whole weights for a use outside the training forward (evaluation, index refresh),
        sharded again afterwards; nothing to do in the other layouts."""
        self.unshard()
        try:
            yield
        finally:
            for unit in self._units():
                unit.reshard()

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch: gradients are synchronised only after the step's last one."""
        if last or self.layout == "single":
            yield
        elif self.layout == "zero2":
            self.model.set_requires_gradient_sync(False)  # accumulate whole gradients locally, no reduce-scatter
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.forward_module.no_sync():
                yield

    def build_optimizer(self, params: list[nn.Parameter], **kwargs) -> torch.optim.Optimizer:
        """AdamW over `params`; under zero1 each process keeps 1/W of its state (zero2: the parameters are shards)."""
        if self.layout == "zero1":
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def grad_scaler(self, device_type: str, enabled: bool) -> torch.amp.GradScaler:
        """fp16 loss scaling; under zero2 a non-finite value in any rank's gradient shard backs the scale off on all."""
        if self.layout == "zero2":
            return ShardedGradScaler(device_type, enabled=enabled)
        return torch.amp.GradScaler(device_type, enabled=enabled)

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` by the norm over every rank's gradients (COLLECTIVE under zero2); returns that norm."""
        return _full(torch.nn.utils.clip_grad_norm_(list(params), max_norm))

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """COLLECTIVE under zero2: a CPU copy of `module`'s whole state dict, on every rank."""
        return {k: _full(v.detach()).to("cpu", copy=True) for k, v in module.state_dict().items()}

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """COLLECTIVE under zero2: the whole state dict on rank 0 (None elsewhere), keys as the unwrapped model's."""
        if self.layout != "zero2":
            return self.model.state_dict() if dist.rank() == 0 else None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered one tensor at a time, onto rank 0
        state = get_model_state_dict(self.model, options=options)
        return state if dist.rank() == 0 else None

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """COLLECTIVE when sharded: the state of an unsharded AdamW over the same parameters, on rank 0 (else None)."""
        if self.layout == "zero1":
            optimizer.consolidate_state_dict(to=0)
            return optimizer.state_dict() if dist.rank() == 0 else None
        state = optimizer.state_dict()
        if self.layout == "zero2":  # every rank gathers each tensor in the same order; rank 0 keeps them on the CPU
            state["state"] = {i: {k: _full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
        return state if dist.rank() == 0 else None

    def local_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This process's part of the optimizer state as plain tensors (the whole state when not sharded)."""
        if self.layout == "zero1":
            return optimizer.optim.state_dict()  # the local AdamW over this rank's partition
        state = optimizer.state_dict()
        if self.layout == "zero2":
            state["state"] = {
                i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                for i, s in state["state"].items()
            }
        return state

    def load_local_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore what `local_optimizer_state` returned on this rank (same number of processes and layout)."""
        if self.layout == "zero1":
            optimizer.optim.load_state_dict(state)
            return
        if self.layout == "zero2":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {**state, "state": {i: {k: self._as_param_shard(v, params[i], True) for k, v in s.items()}
                                        for i, s in state["state"].items()}}  # fmt: skip
        optimizer.load_state_dict(state)

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore a whole (unsharded) optimizer state, under any layout and number of processes."""
        if self.layout == "zero2":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {**state, "state": {i: {k: self._as_param_shard(v, params[i], False) for k, v in s.items()}
                                        for i, s in state["state"].items()}}  # fmt: skip
        optimizer.load_state_dict(state)  # ZeroRedundancyOptimizer keeps this rank's partition of a whole state

    @staticmethod
    def _as_param_shard(value: torch.Tensor, param: torch.Tensor, local: bool) -> torch.Tensor:
        """An optimizer-state tensor laid out as its (DTensor) parameter: from this rank's shard or the whole tensor."""
        if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value  # AdamW's `step` is a scalar on every rank
        value = value.to(param.device)
        if local:
            return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                      stride=param.stride())  # fmt: skip
        return distribute_tensor(value, param.device_mesh, param.placements)
