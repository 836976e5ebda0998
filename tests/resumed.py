"""A pretraining run interrupted mid-way and resumed, against the same run done in one go."""

from pathlib import Path

import pytest
import torch

from mimkit.train import checkpoint
from mimkit.train.loop import pretrain


class Stop(Exception):
    pass


def interrupt_and_resume(cfg, step: int) -> dict:
    """Pretrain `cfg`, stopped by an exception right after optimizer step `step`, then resume it to the end."""

    def stop(info):
        if info.step == step:
            raise Stop

    with pytest.raises(Stop):
        pretrain(cfg, hooks=[stop])
    return pretrain(cfg, resume="auto")


def equal_weights(full: Path, cut: Path, step: int) -> dict:
    """The model weights of both runs' checkpoints at `step`, asserted bitwise equal; returns the first's."""
    name = f"checkpoint-{step:08d}.pt"
    a = checkpoint.load(full / "checkpoints" / name)["model"]
    b = checkpoint.load(cut / "checkpoints" / name)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a
