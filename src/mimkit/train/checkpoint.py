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
import yaml

import mimkit
from mimkit.serialization import (
    SHARDED_META,
    WeightsError,
    dcp_load,
    fsync_dir,
    os_error,
    os_reason,
    read_sharded,
    read_sharded_meta,
    read_torch,
)

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d{8})(\.pt)?$")  # a file, or a sharded checkpoint's directory
META = SHARDED_META  # a sharded checkpoint's non-tensor state


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason outside the code (no readable data, a lost DataLoader worker,
    an out_dir owned by another run, a checkpoint that cannot be written); the message is one line."""


# What a run writes into its out_dir: a fresh run refuses a directory that holds any of them.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "pictures", "curves.png", "tensorboard", "best.pt",
             "trackers.json", "wandb")


def claim(out_dir: str | Path, resume: str | None, overwrite: bool = False) -> tuple[Path, dict] | None:
    """Make `out_dir` this run's own and say what it continues from: None (start from scratch) or
    (checkpoint path, its state; for a sharded checkpoint only its non-tensor state). Rank 0 calls this.

    A run owns its out_dir. `resume=None` (a fresh run) refuses a directory that holds another run's
    files (`RUN_FILES`) unless `overwrite`, which deletes them first. `resume="auto"` continues the newest
    readable checkpoint there, or starts from scratch where there is none; where every checkpoint is
    unreadable it refuses (`overwrite` starts over). `resume=PATH` refuses when out_dir holds checkpoints
    newer than PATH, or checkpoints of another run (PATH elsewhere), which `overwrite` deletes."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"out_dir {out_dir}: exists and is not a directory")
    existing = list_checkpoints(ckpt_dir)
    if resume is None:
        held = [name for name in RUN_FILES if (out_dir / name).exists()]
        if held and not overwrite:
            raise TrainingError(f"out_dir {out_dir} holds another run ({', '.join(held)}): continue it with "
                                "--resume auto, replace it with --overwrite, or choose another out_dir")
        _remove(out_dir, held)
        return None
    if resume == "auto":
        found = load_latest(ckpt_dir)
        if found is None and existing:
            if not overwrite:
                raise TrainingError(f"{ckpt_dir}: none of its {len(existing)} checkpoint(s) is readable (see the "
                                    "warnings above), so there is nothing to resume; --overwrite starts over")
            _remove(out_dir, [name for name in RUN_FILES if (out_dir / name).exists()])
        return found
    path = Path(resume)
    state = load_meta(path)
    mine = [p for p in existing if p.resolve() != path.resolve()]
    if path.resolve().parent == ckpt_dir.resolve():
        mine = [p for p in mine if _step_of(p) > state["step"]]
        what = f"checkpoints newer than {path.name} ({', '.join(p.name for p in mine)})"
    else:
        what = f"checkpoints of another run ({', '.join(p.name for p in mine[-3:])})"
    if mine and not overwrite:
        raise TrainingError(f"{ckpt_dir} holds {what}: resuming {path} there would mix two runs; --overwrite "
                            "deletes them, or choose another out_dir")
    _remove(ckpt_dir, [p.name for p in mine])
    return path, state


def _remove(directory: Path, names: list[str]) -> None:
    for name in names:
        target = directory / name
        log.warning("--overwrite: deleting %s", target)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    return int(PATTERN.match(path.name)[1])



def write_atomic(path: str | Path, state: object) -> Path:
    """`torch.save(state)` to `path` so that a crash or power loss leaves the old file or the new one,
    never a torn one: written to `.tmp`, fsynced, renamed, and the directory fsynced. A failed write
    removes the `.tmp` and raises a one-line `TrainingError` with the OS's reason (e.g. "disk full")."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        cause = os_error(e)
        if cause is None:
            raise
        raise TrainingError(f"cannot write {path}: {os_reason(cause)}; the previous checkpoint is intact") from None
    return path


def save(directory: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as checkpoint-{step}.pt and delete all but the newest `keep_last`
    (never the one just written)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = write_atomic(directory / f"checkpoint-{step:08d}.pt", state)
    _prune(directory, keep_last, path)
    return path


def _prune(directory: Path, keep_last: int, written: Path) -> None:
    """Delete all checkpoints but the newest `keep_last` and `written`."""
    found = list_checkpoints(directory)
    keep = set(found[-keep_last:]) | {written}
    for old in found:
        if old in keep:
            continue
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
        write_atomic(tmp / META, meta)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_dir(directory)
        _prune(directory, keep_last, path)
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
    return write_atomic(out, read_sharded(path))


# --------------------------------------------------------------------------- a run's state


class Run:
    """The state of one training run beyond its model and optimizer, and the one place that writes it to
    and reads it from its checkpoints: step, data position (epoch and micro-batches of it consumed),
    skipped files, gradient scaler, random streams of every process; plus the config and method that
    let `mimkit.load` rebuild the model. Every process holds one; rank 0 owns `out_dir` (`claim`).

    With several processes and `sharded` (FSDP), checkpoints are DCP directories every process writes;
    otherwise rank 0 writes one file."""

    def __init__(self, out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, generator: torch.Generator, *, config: dict, kind: str,
                 keep_last: int, strategy: str, steps_per_epoch: int, accum_steps: int):
        from mimkit.train import dist

        self.dist = dist
        self.out_dir, self.dir = Path(out_dir), Path(out_dir) / "checkpoints"
        self.model, self.optimizer, self.scaler, self.generator = model, optimizer, scaler, generator
        self.config, self.kind, self.keep_last, self.strategy = config, kind, keep_last, strategy
        self.world = dist.world_size()
        self.sharded = self.world > 1 and strategy == "fsdp"
        self.steps_per_epoch, self.accum_steps = steps_per_epoch, accum_steps
        self.step, self.epoch, self.position, self.skipped = 0, 0, 0, {}
        """Optimizer steps done; the epoch being read and the micro-batches of it consumed (empty ones
        too, which no step counts); unreadable files seen (path -> reason)."""

    def resume(self, resume: str | None, overwrite: bool = False) -> Path | None:
        """Claim out_dir (rank 0; see `claim`) and load the checkpoint it names into the model, optimizer
        and this state on every process. Returns that checkpoint, or None for a fresh start."""
        from mimkit.architecture import load_checked

        claimed, error = None, None
        if self.dist.is_main():
            try:
                claimed = claim(self.out_dir, resume, overwrite)
            except (TrainingError, WeightsError, OSError) as e:
                error = e
        path, message = self.dist.broadcast_object((claimed[0] if claimed else None, error and str(error)))
        if error is not None:
            raise error
        if message is not None:  # rank 0 refused: every process stops with its reason
            raise TrainingError(message)
        if self.dist.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        if path is None:
            if resume == "auto":
                log.info("no checkpoint in %s; starting from scratch", self.dir)
            return None
        state = claimed[1] if claimed else None
        if self.sharded:
            if not path.is_dir():
                raise WeightsError(f"{path}: train.strategy=fsdp resumes from a sharded checkpoint directory")
            state = load_sharded(path, self.model, self.optimizer)
        else:
            if path.is_dir():
                raise WeightsError(f"{path}: a sharded checkpoint resumes with train.strategy=fsdp on several "
                                   "processes (or convert it: mimkit.train.checkpoint.consolidate)")
            state = state if state is not None else load(path)
            load_checked(self.model, state["model"], f"checkpoint {path}")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("world_size", 1) != self.world:
            log.warning("checkpoint %s was written by %d process(es), this run has %d: the data order and "
                        "random streams do not continue exactly", path, state.get("world_size", 1), self.world)
        ranks, rank = state.get("rng_ranks"), self.dist.rank()
        set_rng_state(ranks[rank] if ranks and rank < len(ranks) else state["rng"], self.generator)
        self.step, self.skipped = state["step"], dict(state["skipped"])
        self.epoch, self.position = state["epoch"], state.get("position")
        if self.position is None:  # written before the position was stored, when a step was always full
            self.position = (self.step - self.epoch * self.steps_per_epoch) * self.accum_steps
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save(self) -> Path | None:
        """Write a checkpoint of the current state (a collective: every process calls it); returns its
        path on rank 0 (and on every process when sharded), else None."""
        gathered = self.dist.gather_objects((rng_state(self.generator), self.skipped))
        state = None
        if self.dist.is_main():
            for _, theirs in gathered[1:]:
                for name, reason in theirs.items():
                    self.skipped.setdefault(name, reason)
            state = {"scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                     "position": self.position, "rng": gathered[0][0], "skipped": list(self.skipped.items()),
                     "config": self.config, "method": self.kind, "version": mimkit.__version__}
            if self.world > 1:
                state.update(rng_ranks=[rng for rng, _ in gathered], world_size=self.world, strategy=self.strategy)
        if self.sharded:
            return save_sharded(self.dir, self.step, state, self.model, self.optimizer, self.keep_last)
        if self.dist.is_main():
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **state}
            return save(self.dir, self.step, state, self.keep_last)
        return None

    def last_good(self) -> str:
        """Where the run can be resumed from, for messages."""
        found = list_checkpoints(self.dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"

