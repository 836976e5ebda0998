"""Atomic, self-describing checkpoints and the RNG state that makes resume exact.

A checkpoint is one `torch.save` file `checkpoint-{step:08d}.pt`, written to `.tmp` and renamed
(`os.replace` is atomic on POSIX), so a crash mid-write never leaves a broken latest checkpoint.
Model weights are saved unwrapped (no `module.` / `_orig_mod.` prefixes).

With `train.strategy=fsdp` a checkpoint is a directory `checkpoint-{step:08d}/` instead, written by
every process at once with `torch.distributed.checkpoint` (DCP) and renamed from `.tmp` when complete:

    checkpoint-00001000/
      .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: {"model": ..., "optimizer": ...}, each process
                                                   writing its own shards (parameter names unwrapped;
                                                   optimizer state keyed by parameter name)
      state.pt                                     torch.save of everything else: step, epoch, scaler,
                                                   RNG of every rank, skipped files, config, method, version

DCP reshards on load, so such a checkpoint resumes on any number of processes; `load` (and
`consolidate`, which writes it as one ordinary checkpoint file) reads it in a single process.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mimkit.serialization import SHARDED_META, WeightsError, dcp_load, read_sharded, read_sharded_meta, read_torch

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d{8})(\.pt)?$")  # a file, or a sharded checkpoint's directory
META = SHARDED_META  # a sharded checkpoint's non-tensor state


def save(directory: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as checkpoint-{step}.pt and delete all but the newest `keep_last`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    _prune(directory, keep_last)
    return path


def _prune(directory: Path, keep_last: int) -> None:
    for old in list_checkpoints(directory)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if PATTERN.match(p.name) and p.is_dir() != p.name.endswith(".pt")),
                  key=lambda p: p.name.removesuffix(".pt"))


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU; a missing or unreadable file raises a one-line error. A sharded
    checkpoint (a directory) is gathered into one state: its model weights whole, its optimizer state
    keyed by parameter name."""
    if Path(path).is_dir():
        return read_sharded(Path(path))
    state = read_torch(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise WeightsError(f"{path}: not a mimkit training checkpoint (no 'model' and 'step' entries)")
    return state


def load_latest(directory: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, skipping (and naming) unreadable ones; None if there is none.
    For a sharded checkpoint the state returned is `load_meta`'s (no tensors)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_meta(path) if path.is_dir() else load(path)
        except WeightsError as e:
            log.warning("skipping %s", e)
    return None


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a run draws from: torch (CPU and CUDA), NumPy, Python, and the run's generator."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


# --------------------------------------------------------------------------- sharded checkpoints (FSDP)


def load_meta(path: str | Path) -> dict:
    """A sharded checkpoint's non-tensor state (step, RNG, config, ...), checking that its DCP part is
    complete; for a checkpoint file, the whole checkpoint."""
    return read_sharded_meta(path) if Path(path).is_dir() else load(path)


def save_sharded(directory: str | Path, step: int, meta: dict | None, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, keep_last: int) -> Path:
    """Write a sharded checkpoint of an FSDP model and its optimizer; every process calls this (it is a
    collective). `meta` (the non-tensor state) is written by rank 0, which passes it; others pass None."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    path = directory / f"checkpoint-{step:08d}"
    tmp = directory / f"checkpoint-{step:08d}.tmp"
    main = dist.get_rank() == 0
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if main:  # dcp.save returns on rank 0 once every shard and the metadata are written
        torch.save(meta, tmp / META)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _prune(directory, keep_last)
    dist.barrier()  # nobody reads or prunes while rank 0 renames
    return path


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint into an FSDP model and its optimizer on every process (a collective),
    resharding to the current number of processes; returns its non-tensor state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = load_meta(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write a sharded checkpoint as one ordinary checkpoint file (`mimkit.load`, `mimkit eval` and
    `mimkit export` read it); default: beside it, as `checkpoint-{step}-whole.pt` (a name that resume
    does not pick up: its optimizer state is keyed by parameter name). Runs in one process."""
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(path.name + "-whole.pt")
    state = read_sharded(path)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out
