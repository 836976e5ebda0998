"""Optimizer parameter groups and the learning-rate schedule (MAE `lr_sched`, `param_groups_lrd`)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on 1-D tensors (norms, biases) and `model.no_weight_decay()`;
    with `layer_decay` < 1 each group's `lr_scale` is `layer_decay ** (L + 1 - layer_id)` (MAE fine-tuning)."""
    skip = model.no_weight_decay()
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        layer = model.layer_id(name) if layer_decay < 1.0 else num_layers
        group = groups.setdefault((layer, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                layer_decay: float = 1.0, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `fused=True` updates all parameters in one kernel (CUDA)."""
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup from 0, then half-cosine decay to `min_lr` (MAE `adjust_learning_rate`)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's lr to `lr` times its layer-decay scale; returns `lr`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
