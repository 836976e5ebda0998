"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO's protocol).

Features are L2-normalised; each test image takes its k most cosine-similar training images, whose
labels vote with weight exp(similarity / T). The similarity matrix is computed `chunk_size` test
images at a time, so a 50k x 10k evaluation needs chunk x 50k floats, not 10k x 50k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.config import Config, size_pair
from mimkit.eval.context import Context, accuracy, features_of, labelled_data
from mimkit.eval.features import extract
from mimkit.train.loop import StepInfo


def knn_scores(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """Class scores (M, C) for queries (M, D) from a labelled bank (N, D), (N,)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()))
    return torch.cat(scores)


def run(ctx: Context, resume: str | None = None) -> dict:
    """kNN top-1/top-5 of the frozen encoder; the training split is the bank. (`resume`: nothing to resume.)"""
    p = ctx.cfg.probe
    bank, bank_labels, queries, labels = features_of(ctx, p.pool)
    scores = knn_scores(bank, bank_labels, queries, ctx.num_classes, p.k, p.temperature, p.chunk_size)
    return {**accuracy(scores, labels), "k": p.k, "temperature": p.temperature, "pool": p.pool,
            "bank": len(bank_labels), "queries": len(labels)}


class KNNMonitor:
    """A pretraining hook: kNN top-1 of the model being trained, every `every_epochs` epochs, on
    fixed labelled subsets (so the numbers of a run are comparable along it)."""

    def __init__(self, bank_set, query_set, transform, every_epochs: int, pool: str = "cls", k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256):
        self.bank_set, self.query_set, self.transform = bank_set, query_set, transform
        self.every, self.pool, self.k, self.temperature = every_epochs, pool, k, temperature
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: Config) -> KNNMonitor:
        """The monitor a pretraining config asks for (`monitor.*`), on its own data source."""
        from mimkit.models import model_config_of

        m, model = cfg.monitor, model_config_of(cfg)
        bank, queries, transform = labelled_data(cfg.data, size_pair(model.img_size), ("train", "test"),
                                                 (m.bank_size, m.query_size), strict=False, channels=model.in_chans)
        return cls(bank, queries, transform, m.every_epochs, m.pool, m.k, m.temperature)

    def __call__(self, info: StepInfo) -> dict | None:
        if not info.end_of_epoch or (info.epoch + 1) % self.every:
            return None
        bank, bank_labels = extract(info.model, self.bank_set, self.transform, self.pool, self.batch_size)
        queries, labels = extract(info.model, self.query_set, self.transform, self.pool, self.batch_size)
        num_classes = int(max(bank_labels.max(), labels.max())) + 1
        scores = knn_scores(bank, bank_labels, queries, num_classes, self.k, self.temperature)
        return {f"knn_{key}": value for key, value in accuracy(scores, labels).items()}
