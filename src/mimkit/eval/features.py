"""Frozen features of an encoder: the cls token, the mean of the patch tokens, or the patch tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, Subset

from mimkit.data import Sample, make_loader, set_epoch
from mimkit.train import dist


def features(model: nn.Module, imgs: Tensor, pool: str = "cls") -> Tensor:
    """Features of `imgs` (B, C, H, W), normalised as for training, at the model's resolution.

    `model.pooled_features` (pool "cls", "mean" or "tokens"; see there), in eval mode (restored
    afterwards), without gradients.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.pooled_features(imgs, pool)
    finally:
        model.train(was_training)


class FeatureSet(Dataset):
    """Precomputed features (N, ...) with labels, served like an image dataset (`Sample`s)."""

    def __init__(self, feats: Tensor, labels: Tensor):
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.feats[i], int(self.labels[i]), f"feature {i}")


def in_shares(dataset: Dataset, fn: Callable[[Tensor], Tensor], *, batch_size: int, empty: Tensor,
              transform=None, device: torch.device | str = "cpu", num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """`fn` (a batch -> rows) over a whole dataset in order: (rows, labels (N,)).

    Each batch goes to `device` and through `transform` (if given) before `fn`. Unreadable files are
    left out (the loader reports them). Under torchrun every process calls this (a collective): each
    maps its share, calling `fn(empty)` when its share is done or a batch was all unreadable so that
    FSDP's weight gathers in forward stay paired across processes, and every process gets all the rows,
    grouped by rank (an order that accuracy, kNN and probes ignore)."""
    rank, world = dist.rank(), dist.world_size()
    if world > 1 and not isinstance(dataset, IterableDataset):
        dataset, rank, world = Subset(dataset, range(rank, len(dataset), world)), 0, 1
    loader = make_loader(dataset, batch_size, seed=0, shuffle=False, drop_last=False, num_workers=num_workers,
                         rank=rank, world_size=world)
    set_epoch(loader, 0)
    rows, labels, batches = [], [], iter(loader)
    while dist.any_rank((batch := next(batches, None)) is not None):
        if batch is None or not batch["images"].shape[0]:
            fn(empty)
            continue
        x = batch["images"].to(device)
        rows.append(fn(transform(x) if transform is not None else x).float().cpu())
        labels.append(batch["labels"])
    shares = dist.all_gather_objects((torch.cat(rows), torch.cat(labels)) if rows else None)
    shares = [share for share in shares if share is not None]
    if not shares:
        raise ValueError("no readable image in the dataset: the loader skipped every file")
    return torch.cat([r for r, _ in shares]), torch.cat([y for _, y in shares])


def extract(model: nn.Module, dataset: Dataset, transform, pool: str = "cls", batch_size: int = 256,
            num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Features of a whole dataset: (N, D) or (N, K, D) and labels (N,), in the dataset's order in
    one process (see `in_shares` for torchrun). `transform` maps a loader batch (B, C, S, S') to the
    model's normalised input."""
    device = next(model.parameters()).device
    empty = torch.zeros(0, model.in_chans, *model.img_size, device=device)
    return in_shares(dataset, lambda x: features(model, x, pool), batch_size=batch_size, transform=transform,
                     empty=empty, device=device, num_workers=num_workers)
