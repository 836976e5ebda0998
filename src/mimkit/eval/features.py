"""Frozen features of an encoder: the cls token, the mean of the patch tokens, or the patch tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, Subset

from mimkit.data import Sample, make_loader, set_epoch
from mimkit.train import dist

POOLS = ("cls", "mean", "tokens")


def features(model: nn.Module, imgs: Tensor, pool: str = "cls") -> Tensor:
    """Features of `imgs` (B, C, H, W), normalised as for training, at the model's resolution.

    pool="cls": the cls token (B, D); "mean": the mean of the patch tokens (B, D); "tokens": the patch
    tokens (B, N, D), without the cls token. Tokens are taken after the final norm
    (`model.forward_features`): no masking, eval mode (restored afterwards), no gradients. For a
    classifier that pools by averaging (`global_pool="avg"`, MAE fine-tuning) the final norm is
    `fc_norm`, applied after the mean, so "mean" is exactly what its head sees, while "cls" and
    "tokens" are un-normalised.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = model.forward_features(imgs)  # (B, 1 + N, D)
            if pool == "cls":
                return x[:, 0]
            if pool == "tokens":
                return x[:, 1:]
            mean = x[:, 1:].mean(dim=1)  # (B, D)
            return model.fc_norm(mean) if getattr(model, "global_pool", "token") == "avg" else mean
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


def extract(model: nn.Module, dataset: Dataset, transform, pool: str = "cls", batch_size: int = 256,
            num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Features of a whole dataset: (N, D) or (N, K, D) and labels (N,).

    `transform` maps a uint8 batch (B, 3, S, S) to the model's normalised input. Unreadable files
    are left out (the loader reports them). In one process the rows are in the dataset's order.
    Under torchrun every process calls it (a collective): each embeds its own share and every
    process gets all the rows, grouped by rank (an order that kNN and probes ignore)."""
    device = next(model.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    if world > 1 and not isinstance(dataset, IterableDataset):
        dataset, rank, world = Subset(dataset, range(rank, len(dataset), world)), 0, 1
    loader = make_loader(dataset, batch_size, seed=0, shuffle=False, drop_last=False, num_workers=num_workers,
                         rank=rank, world_size=world)
    set_epoch(loader, 0)
    size = model.patch_embed.img_size
    feats, labels, batches = [], [], iter(loader)
    # Shares can differ by a batch; a process whose share is done (or whose batch was all unreadable)
    # embeds an empty batch, so that FSDP's weight gathers in forward stay paired across processes.
    while dist.any_rank((batch := next(batches, None)) is not None):
        empty = batch is None or not batch["images"].shape[0]
        imgs = torch.zeros(0, 3, size, size, device=device) if empty else transform(batch["images"].to(device))
        out = features(model, imgs, pool)
        if not empty:
            feats.append(out.float().cpu())
            labels.append(batch["labels"])
    shares = dist.all_gather_objects((torch.cat(feats) if feats else None, torch.cat(labels) if labels else None))
    shares = [share for share in shares if share[0] is not None]
    if not shares:
        raise ValueError("no readable image to extract features from: the loader skipped every file")
    return torch.cat([f for f, _ in shares]), torch.cat([y for _, y in shares])
