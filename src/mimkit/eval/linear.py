"""Linear probing as in MAE (appendix A.2): a frozen encoder, BatchNorm without affine parameters
before a linear head, LARS with base lr 0.1 (x batch / 256), no weight decay, warmup then cosine."""

from __future__ import annotations

import torch
from torch import nn

from mimkit.eval.context import Context, probe


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MAE's `util/lars.py`:
    for every parameter with more than one dimension the update (gradient + weight decay) is scaled
    by `trust_coefficient * ||w|| / ||update||` (1 when either norm is 0); biases and norms are not."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), g["trust_coefficient"] * w_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-g["lr"])
        return loss


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps 1e-6) then Linear, weights N(0, 0.01) truncated (MAE)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def probe_optimizer(params, cfg) -> torch.optim.Optimizer:
    """`probe.optimizer`: LARS (MAE) or SGD with momentum 0.9 (CAE's attentive probing); lr is set per step."""
    if cfg.probe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=cfg.train.weight_decay)
    return LARS(params, weight_decay=cfg.train.weight_decay)


def run(ctx: Context, resume: str | None = None, cached=None) -> dict:
    """Linear probe of `ctx.encoder`; `cached` = `features_of(ctx, pool)` skips recomputing features."""
    torch.manual_seed(ctx.cfg.train.seed)
    head = linear_head(ctx.encoder.embed_dim, ctx.num_classes)
    optimizer = probe_optimizer(head.parameters(), ctx.cfg)
    result = probe(ctx, head, ctx.cfg.probe.pool, optimizer, "linprobe", resume, cached)
    return {**result, "pool": ctx.cfg.probe.pool}
