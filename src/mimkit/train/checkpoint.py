"""Atomic, self-describing checkpoints and the RNG state that makes resume exact.

A checkpoint is one `torch.save` file `checkpoint-{step:08d}.pt`, written to `.tmp` and renamed
(`os.replace` is atomic on POSIX), so a crash mid-write never leaves a broken latest checkpoint.
Model weights are saved unwrapped (no `module.` / `_orig_mod.` prefixes).
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from mimkit.convert import WeightsError, read_file

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")


def save(directory: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` atomically as checkpoint-{step}.pt and delete all but the newest `keep_last`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU; a missing or unreadable file raises a one-line error."""
    state = read_file(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise WeightsError(f"{path}: not a mimkit training checkpoint (no 'model' and 'step' entries)")
    return state


def load_latest(directory: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, skipping (and naming) unreadable ones; None if there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
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
