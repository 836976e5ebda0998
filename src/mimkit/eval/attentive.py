"""Attentive probing as in CAE (Chen et al. 2024, sec. 4.1): a learnable query attends to the frozen
patch tokens through one cross-attention block; its output goes through BatchNorm (no affine) and a
linear classifier. Unlike a linear probe on the cls token it can pick the tokens that matter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.eval.context import Context, probe
from mimkit.eval.linear import linear_head, probe_optimizer
from mimkit.models.vit import LN_EPS


class AttentiveHead(nn.Module):
    """tokens (B, N, D) -> logits (B, classes): query . LayerNorm(tokens) cross-attention, then BN + linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.classifier = linear_head(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        B, N, D = tokens.shape
        h = self.num_heads
        q = self.q(self.query).reshape(1, 1, h, D // h).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, 1, D/H)
        k, v = self.kv(self.norm(tokens)).reshape(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # (B, H, N, D/H)
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(B, D)  # (B, H, 1, D/H) -> (B, D)
        return self.classifier(self.proj(pooled))


def run(ctx: Context, resume: str | None = None) -> dict:
    torch.manual_seed(ctx.cfg.train.seed)
    heads = ctx.cfg.probe.num_heads or ctx.encoder.num_heads
    head = AttentiveHead(ctx.encoder.embed_dim, ctx.num_classes, heads)
    optimizer = probe_optimizer(head.parameters(), ctx.cfg)
    return probe(ctx, head, "tokens", optimizer, "attnprobe", resume)
