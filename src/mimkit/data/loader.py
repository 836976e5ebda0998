"""Batches of uint8 images: collate with the bad-file policy, and a resumable, rank-aware sampler."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from mimkit.data.crops import epoch_key
from mimkit.data.decode import BadImageError, Sample


def collate(samples: Sequence[Sample]) -> dict:
    """Samples -> {"images": uint8 (B, 3, S, S), "labels": int64 (B,), "skipped": [(path, reason)]}.

    Unreadable samples are dropped and listed in "skipped", so B can be smaller than the batch
    size, even 0 (then "images" is (0, 3, 0, 0)).
    """
    good = [s for s in samples if s.image is not None]
    images = torch.stack([s.image for s in good]) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return {
        "images": images,
        "labels": torch.tensor([s.label for s in good], dtype=torch.int64),
        "skipped": [(s.path, s.reason) for s in samples if s.image is None],
    }


def check_skipped(batch: dict, strict: bool, seen: dict[str, str]) -> None:
    """Apply the bad-file policy to a batch: in strict mode raise BadImageError for its first
    unreadable file, else record its files in `seen` (path -> reason, each file once per run)."""
    if strict and batch["skipped"]:
        raise BadImageError(*batch["skipped"][0])
    for path, reason in batch["skipped"]:
        seen.setdefault(path, reason)


class ResumableSampler(Sampler[int]):
    """Sample indices for one rank, in an order fixed by (seed, epoch), resumable mid-epoch.

    Epoch e's order is torch.randperm(num_samples) from a generator seeded by (seed, e) (or
    0..N-1 without shuffle), the same on every rank and every run. The order is padded by
    wrapping around (or, with drop_last, cut) to a multiple of world_size, and rank r takes
    positions r, r + world_size, ...: the shares are disjoint and equally long.
    `set_epoch(e, start)` selects the epoch and skips the first `start` indices of this rank's
    share, e.g. start = steps_done_this_epoch * batch_size when resuming. With `keyed`, it yields
    (index, `crops.epoch_key(seed, epoch)`) pairs, the keys of a dataset that crops per sample.
    """

    def __init__(
        self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
        drop_last: bool = False, keyed: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size, self.keyed = rank, world_size, keyed
        self.share = num_samples // world_size if drop_last else -(-num_samples // world_size)  # per rank
        if self.share == 0:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.share:
            raise ValueError(f"start {start} is outside this rank's {self.share} samples")
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """This rank's whole share for the current epoch, int64 (share,)."""
        if self.shuffle:
            # A hash, not seed + epoch (torch's DistributedSampler), so distinct (seed, epoch)
            # pairs never share an order.
            key = hashlib.sha256(f"{self.seed},{self.epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        total = self.share * self.world_size
        order = order.repeat(-(-total // self.num_samples))[:total]  # wrap around to pad
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self.order()[self.start :].tolist()
        if not self.keyed:
            return iter(indices)
        key = epoch_key(self.seed, self.epoch)
        return ((i, key) for i in indices)

    def __len__(self) -> int:
        return self.share - self.start


class Stream(IterableDataset):
    """A dataset read in order (`ShardDataset`, `HFStream`) that splits itself over ranks and loader workers:
    `split` gives the view one rank iterates (what `make_loader` does), `set_epoch(epoch, start)` selects
    the epoch and resumes it after `start` samples. A subclass sets `num_samples` and implements `__len__`
    (samples of the view per epoch) and `__iter__`; the dataset itself is rank 0 of 1, unshuffled."""

    rank, world_size, batch_size, seed, shuffle, epoch, start = 0, 1, 0, 0, False, 0, 0
    num_samples: int

    def split(self, rank: int, world_size: int, batch_size: int = 0, seed: int = 0, shuffle: bool = True) -> Stream:
        """The view of one rank: its share of every epoch, whole batches of `batch_size` (0: every sample once)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        view = copy.copy(self)
        view.rank, view.world_size, view.batch_size = rank, world_size, batch_size
        view.seed, view.shuffle, view.epoch, view.start = seed, shuffle, 0, 0
        if len(view) == 0:
            raise ValueError(f"{self.num_samples} samples cannot give each of {world_size} rank(s) a batch of "
                             f"{batch_size}")
        return view

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip the first `start` samples of this view's share (whole batches)."""
        if start and (not self.batch_size or start % self.batch_size):
            raise ValueError(f"start {start} must be a multiple of the batch size {self.batch_size}")
        if not 0 <= start <= len(self):
            raise ValueError(f"start {start} is outside this rank's {len(self)} samples")
        self.epoch, self.start = epoch, start


def make_loader(
    dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = True,
    num_workers: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's share, yielding `collate` dicts.

    Call `set_epoch(loader, epoch, start)` before iterating each epoch. For a map-style dataset it sets
    the sampler, which runs in the main process, so workers persist across epochs. A stream
    (`ShardDataset`, an IterableDataset) splits itself over ranks and workers (`dataset.split`); its
    workers start afresh each epoch, so that they see the epoch.
    """
    if isinstance(dataset, IterableDataset):
        view = dataset.split(rank, world_size, batch_size if drop_last else 0, seed, shuffle)
        return DataLoader(view, batch_size=batch_size, drop_last=drop_last, collate_fn=collate,
                          num_workers=num_workers, pin_memory=pin_memory)
    keyed = getattr(dataset, "crop", None) is not None  # a dataset that crops per sample (ImageFolder)
    sampler = ResumableSampler(len(dataset), seed, shuffle, rank, world_size, drop_last, keyed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
        # Each new iterator draws a worker base seed; its own generator keeps it from consuming
        # the global torch RNG (and so from shifting model init or masking between runs).
        generator=torch.Generator().manual_seed(seed),
    )


def stop_workers(iterator=None) -> None:
    """End a DataLoader iterator's worker processes now (a single-process iterator has none). Needed
    when a run fails, above all when a worker died: while the others' pids stay registered, torch's
    SIGCHLD handler raises that death again wherever the process is, whenever any child exits."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        return
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    try:
        shutdown()
    except (OSError, RuntimeError):  # the queues of a dead worker may be broken
        pass


def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Select the epoch of a `make_loader` loader and skip the first `start` samples of this rank's
    share (e.g. steps done this epoch x accumulation x batch size, when resuming)."""
    target = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
    target.set_epoch(epoch, start)
