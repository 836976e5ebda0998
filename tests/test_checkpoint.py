"""A run's state and its out_dir: ownership, durable checkpoint writes, failed writes, damaged metrics,
data that yields nothing, a lost DataLoader worker."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.metrics import read_metrics
from mimkit.train import checkpoint
from mimkit.train.checkpoint import TrainingError
from mimkit.train.loop import pretrain

# 64 CIFAR images, batch 32: 2 steps per epoch, 4 in all.
SMALL = ["model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1", "data.limit=64",
         "data.num_workers=0", "train.batch_size=32", "train.epochs=2", "train.warmup_epochs=0",
         "train.log_every=1", "train.vis_images=0"]


RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "mae_vit_tiny_cifar10.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def small(out: Path, cache: str, *extra: str):
    return load_config(None, [*SMALL, f"data.cache_dir={cache}", f"out_dir={out}", *extra])


def _names(out: Path) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")]


def test_a_fresh_run_refuses_an_out_dir_holding_another_run(tmp_path, cache):
    pretrain(small(tmp_path, cache, "train.epochs=4"))  # another run, with higher step numbers
    assert _names(tmp_path)[-1] == "checkpoint-00000008.pt"
    with pytest.raises(TrainingError, match=rf"^out_dir {tmp_path} holds another run \(checkpoints, metrics\.jsonl, "
                                            r"config\.yaml\): continue it with --resume auto, replace it with "
                                            r"--overwrite, or choose another out_dir$"):
        pretrain(small(tmp_path, cache))
    assert _names(tmp_path)[-1] == "checkpoint-00000008.pt"  # nothing of the old run was touched

    summary = pretrain(small(tmp_path, cache), overwrite=True)
    assert summary["checkpoint"].is_file() and summary["checkpoint"].name == "checkpoint-00000004.pt"
    assert _names(tmp_path) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]  # the new run's only
    again = pretrain(small(tmp_path, cache, "train.epochs=3"), resume="auto")  # continues the new run
    assert again["step"] == 6 and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        checkpoint.save(d, step, {"model": {}, "step": step}, keep_last=3)
    path = checkpoint.save(d, 5, {"model": {}, "step": 5}, keep_last=2)
    assert path.is_file() and _names(tmp_path) == ["checkpoint-00000005.pt", "checkpoint-00000020.pt",
                                                   "checkpoint-00000030.pt"]


def test_resume_auto_refuses_when_every_checkpoint_is_unreadable(tmp_path, cache):
    pretrain(small(tmp_path, cache))
    for p in checkpoint.list_checkpoints(tmp_path / "checkpoints"):
        p.write_bytes(b"torn")
    with pytest.raises(TrainingError, match=r"checkpoints: none of its 2 checkpoint\(s\) is readable .* nothing to "
                                            r"resume; --overwrite starts over$"):
        pretrain(small(tmp_path, cache), resume="auto")
    assert pretrain(small(tmp_path, cache), resume="auto", overwrite=True)["step"] == 4


def test_resume_from_an_older_checkpoint_refuses_the_newer_ones(tmp_path, cache):
    pretrain(small(tmp_path, cache, "train.ckpt_every=1", "train.keep_last=4"))
    older = tmp_path / "checkpoints" / "checkpoint-00000002.pt"
    with pytest.raises(TrainingError, match=r"holds checkpoints newer than checkpoint-00000002\.pt "
                                            r"\(checkpoint-00000003\.pt, checkpoint-00000004\.pt\): resuming"):
        pretrain(small(tmp_path, cache), resume=str(older))
    assert pretrain(small(tmp_path, cache), resume=str(older), overwrite=True)["step"] == 4


def test_a_partial_last_metrics_line_does_not_block_resume(tmp_path, cache):
    pretrain(small(tmp_path, cache, "train.epochs=1"))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.5')  # a crash mid-write
    summary = pretrain(small(tmp_path, cache), resume="auto")
    assert summary["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_checkpoints_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save(tmp_path, 1, {"model": {}, "step": 1}, keep_last=1)
    assert synced == [False, True]  # the file before the rename, its directory after


def test_a_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path, 1, {"model": {"w": torch.ones(3)}, "step": 1}, keep_last=3)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TrainingError, match=r"^cannot write .*checkpoint-00000002\.pt: disk full \(\[Errno 28\]\); "
                                            r"the previous checkpoint is intact$"):
        checkpoint.save(tmp_path, 2, {"model": {"w": torch.zeros(3)}, "step": 2}, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))


def test_a_write_the_os_refuses_ends_the_command_in_one_line(tmp_path, cache):
    """A real failed write: the process may write no file larger than 1 MB (RLIMIT_FSIZE), so the first
    checkpoint (several MB) fails inside torch.save."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from mimkit.cli import main
        sys.exit(main(["pretrain", {RECIPE!r}, *{[*SMALL, f"data.cache_dir={cache}", f"out_dir={tmp_path}"]!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("mimkit: error")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "checkpoint-00000002.pt: File too large ([Errno 27])" in errors[0]
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .tmp left behind


def test_a_folder_of_unreadable_files_stops_the_run(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(12):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"not a jpeg")
    args = ["data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.num_workers=0",
            "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1",
            "train.batch_size=4", "train.epochs=2", "train.vis_images=0", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(TrainingError, match=r"^3 batches in a row had no readable image \(12 unreadable file\(s\) "
                                            r"so far, e\.g\. .*\.jpg\): nothing to train on$"):
        pretrain(load_config(None, args))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_batches_are_passed_over_and_never_counted_as_steps(tmp_path):
    """Half the files unreadable, so that half the batches (of one image) are empty: every step still
    trains on real images, the loss logged is never the 0.0 of an empty step, and the run makes the
    empty batches up by reading on (16 steps for one epoch of 16 batches: two passes over the data)."""
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(16):
        path = tmp_path / "imgs" / "a" / f"{i:02d}.png"
        if i % 2:
            path.write_bytes(b"broken")
        else:
            Image.new("RGB", (32, 32), (i * 10, 100, 200)).save(path)
    args = ["data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.num_workers=0", "data.load_size=32",
            "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1", "model.decoder_depth=1",
            "train.batch_size=1", "train.epochs=1", "train.log_every=1", "train.vis_images=0",
            f"out_dir={tmp_path / 'run'}"]
    summary = pretrain(load_config(None, args))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["step"] == 16 and len(summary["skipped"]) == 8  # each unreadable file reported once
    assert all(r["loss"] > 0.1 for r in records) and [r["step"] for r in records] == list(range(1, 17))
    assert checkpoint.load(summary["checkpoint"])["epoch"] == 1  # the second pass


def test_a_killed_dataloader_worker_ends_the_run_in_one_line(tmp_path, cache):
    def kill_workers(info):
        if info.step == 1:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)

    cfg = small(tmp_path, cache, "data.num_workers=1", "train.epochs=4")
    with pytest.raises(TrainingError, match=r"^a data-loading worker died \(DataLoader worker .*\); the checkpoints "
                                            r"are intact: resume with --resume auto"):
        pretrain(cfg, hooks=[kill_workers])


def test_cli_overwrite_and_resume_flags(tmp_path, cache, capsys):
    args = ["pretrain", RECIPE, *SMALL, f"data.cache_dir={cache}", f"out_dir={tmp_path}"]
    assert main(args) == 0
    assert main(args) == 2
    assert "holds another run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume", "auto", "train.epochs=3"]) == 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
