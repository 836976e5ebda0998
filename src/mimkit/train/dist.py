"""Process-group facts and wrappers, read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
and nowhere else.

`torchrun --nproc-per-node N -m mimkit pretrain ...` starts N processes with those variables set;
`process_group` joins them (NCCL on CUDA, gloo on the CPU) and leaves at the end, `wrap` puts the
model under DDP or FSDP2 (`train.strategy`), and the small collectives below are what the training
loop needs at log and checkpoint steps. A single process (no WORLD_SIZE, or 1) never touches
`torch.distributed`: every function here then is the identity.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (see below)
from torch import nn

# DDP imports torch.distributed.nn.functional on first use, whose functions take `group=group.WORLD` as a
# default argument: imported while a group exists, they would keep it (and gloo's threads) alive after
# destroy_process_group. Imported here, before any group, they hold None.

STRATEGIES = ("ddp", "fsdp")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def pick_device(name: str) -> torch.device:
    """`auto` -> this process's CUDA device when there is one, else the CPU; `cuda` -> cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    return device


_group_ids = itertools.count(1)  # numbers the process groups this process joins (store key prefixes)


@contextmanager
def process_group(device: torch.device, timeout_minutes: float = 30.0) -> Iterator[None]:
    """Join torchrun's process group for the duration of the block when WORLD_SIZE > 1 (NCCL for CUDA
    devices, gloo for the CPU), and leave it afterwards. Already inside a group, or alone: nothing.

    Log records of the `mimkit` logger below WARNING are kept to rank 0 (one copy of each line)."""
    if world_size() <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("GROUP_WORLD_SIZE") == "1":
        # torchrun's agent keeps one store across restarts (--max-restarts): a restarted process group
        # would read the keys of the attempt that failed (pytorch/pytorch#135712; gloo then connects to
        # a dead peer). With one node every process sees the same restart count, so each attempt gets
        # its own key prefix. Several nodes: launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead.
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size(), is_master=False,
                              timeout=timeout)
        # (and each group of an attempt its own: a process may join several in turn)
        prefix = f"mimkit/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/group-{next(_group_ids)}"
        store = dist.PrefixStore(prefix, store)
        kwargs.update(store=store, rank=rank(), world_size=world_size())
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    logger = logging.getLogger("mimkit")
    level = logger.level
    if rank() != 0:
        logger.setLevel(logging.WARNING)
    try:
        yield
        dist.barrier()  # the last collective is done everywhere
        # gloo's threads release each finished collective's tensors, and need the GIL for it: let them have
        # it now. A thread still waiting for it when the interpreter shuts down aborts the process
        # ("terminate called without an active exception"), and torchrun counts the finished job as failed.
        time.sleep(0.1)
    finally:
        logger.setLevel(level)
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Elementwise `sum`, `min` or `max` of a tensor over processes, as a new tensor on x's device; x
    itself alone. A collective: every process calls it at the same point."""
    if not is_distributed():
        return x
    y = x.to(_device_for_collectives(), copy=True)
    dist.all_reduce(y, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return y.to(x.device)


def any_rank(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective)."""
    return bool(all_reduce(torch.tensor([int(flag)]), "max").item())


def broadcast_object(obj):
    """Rank 0's `obj` on every process (a picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every process's `obj`, in rank order, on rank 0 (None elsewhere); `[obj]` alone."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process; `[obj]` alone."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------- model wrapping


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of transformer blocks: every ModuleList named `*blocks` (encoder `blocks`,
    `decoder_blocks`, CAE's `regressor_blocks`). They are the units of activation checkpointing and
    of FSDP sharding."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("blocks")]


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, device: torch.device) -> nn.Module:
    """The module the loop runs forward and backward through.

    One process: `model` itself. `ddp`: DistributedDataParallel (gradients averaged over processes,
    all-reduced in buckets during backward). `fsdp`: FSDP2 `fully_shard` on every block and then on the
    root, in place: parameters become DTensors sharded over processes (the model is then its own
    wrapper), and the optimizer's parameter lists are pointed at them. Models must be initialised
    identically on every process (same seed): FSDP2 does not broadcast them.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not is_distributed():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = {id(p): name for name, p in model.named_parameters()}
    by_name = {}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            by_name[names[id(p)]] = (group, i)
    if optimizer.state:
        raise RuntimeError("FSDP wraps the model before the optimizer's first step; its state must be empty")
    mesh = init_device_mesh(device.type, (world_size(),))
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # fully_shard replaces each parameter by a sharded DTensor parameter under the same name.
    for name, p in model.named_parameters():
        if name in by_name:
            group, i = by_name[name]
            group["params"][i] = p
    # Methods other than forward that run the whole model (feature extraction by the kNN monitor,
    # evaluation) must gather the root's parameters too.
    for method in ("forward_features",):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    # MAE returns `pred[:, 1:]` (a view); nothing modifies it in place, so FSDP's warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's whole state dict, for rank 0 to save. Under torchrun a collective: an
    FSDP model's shards are gathered (onto rank 0's CPU; the other processes get an empty dict)."""
    if not is_distributed():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def no_sync(wrapped: nn.Module, strategy: str, sync: bool):
    """Context for one accumulation micro-step: with `sync` false, gradients are only accumulated
    locally (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`); the last micro-step syncs."""
    if not is_distributed():
        return nullcontext()
    if strategy == "ddp":
        return nullcontext() if sync else wrapped.no_sync()
    return _fsdp_sync(wrapped, sync)


@contextmanager
def _fsdp_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
