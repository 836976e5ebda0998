"""Frozen features of an encoder: the cls token, the mean of the patch tokens, or the patch tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mimkit.data import Sample, make_loader

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
    """Features of a whole dataset in its order: (N, D) or (N, K, D) and labels (N,).

    `transform` maps a uint8 batch (B, 3, S, S) to the model's normalised input. Unreadable files
    are left out (the loader reports them)."""
    device = next(model.parameters()).device
    loader = make_loader(dataset, batch_size, seed=0, shuffle=False, drop_last=False, num_workers=num_workers)
    loader.sampler.set_epoch(0)
    feats, labels = [], []
    for batch in loader:
        if batch["images"].shape[0]:
            feats.append(features(model, transform(batch["images"].to(device)), pool).float().cpu())
            labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)
