"""End-to-end fine-tuning as in MAE (appendix A.1): layer-wise lr decay, drop path, RandAugment,
mixup / CutMix with label smoothing, random erasing, global average pooling with `fc_norm`, AdamW
(0.9, 0.999), weight decay 0.05, warmup then cosine; validation by resize + center crop. All
augmentation runs batched on the device, its randomness drawn from the loop's generator (RandAugment
and random erasing from torch's global generator, whose state checkpoints also keep)."""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from torch import Tensor, nn

from mimkit.config import ConfigError
from mimkit.data import PretrainAugment
from mimkit.eval.config import FinetuneConfig
from mimkit.eval.context import Context, train_classifier, vit_from
from mimkit.models.vit import VisionTransformer, init_weights
from mimkit.train.optim import build_adamw


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot (B, C) with label smoothing: 1 - s + s / C on the label, s / C elsewhere."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.unsqueeze(1), 1.0 - smoothing + off)


def mix(images: Tensor, labels: Tensor, num_classes: int, cfg: FinetuneConfig,
        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with its reverse, as timm's
    `Mixup` in batch mode: images (B, C, H, W), labels (B,) -> mixed images, soft targets (B, classes).

    lam ~ Beta(alpha, alpha); mixup blends whole images, CutMix pastes a box of area (1 - lam) and
    then sets lam to the exact pasted fraction. Targets are lam * y + (1 - lam) * y.flip(0)."""
    target = soft_targets(labels, num_classes, cfg.smoothing)
    use_mix, use_cut = cfg.mixup > 0, cfg.cutmix > 0
    draws = torch.rand(2, generator=generator)
    if not (use_mix or use_cut) or draws[0] >= cfg.mix_prob:
        return images, target
    cut = use_cut and (not use_mix or draws[1] < cfg.switch_prob)
    alpha = cfg.cutmix if cut else cfg.mixup
    lam = _beta(alpha, generator)
    if cut:
        H, W = images.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = (torch.rand(2, generator=generator) * torch.tensor([H, W])).long().tolist()
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + images.flip(0) * (1 - lam)
    return images, target * lam + target.flip(0) * (1 - lam)


def _gamma(alpha: float, generator: torch.Generator) -> float:
    """Gamma(alpha, 1) drawn with `generator` (Marsaglia & Tsang 2000; alpha < 1 by boosting)."""
    if alpha < 1:
        return _gamma(alpha + 1, generator) * float(torch.rand(1, generator=generator)) ** (1 / alpha)
    d = alpha - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        x = float(torch.randn(1, generator=generator))
        v = (1 + c * x) ** 3
        u = float(torch.rand(1, generator=generator))
        if v > 0 and math.log(u + 1e-30) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) = X / (X + Y) with X, Y ~ Gamma(alpha) (torch's Beta takes no generator)."""
    x, y = _gamma(alpha, generator), _gamma(alpha, generator)
    return x / (x + y)


class FinetuneAugment:
    """RandomResizedCrop + flip, RandAugment, normalisation and random erasing, batched on the device."""

    def __init__(self, size: int | tuple[int, int], cfg: FinetuneConfig, scale, ratio, mean, std):
        if cfg.randaug_n and len(mean) != 3:
            raise ConfigError(f"finetune.randaug_n: RandAugment's colour operations need RGB images, and these have "
                              f"{len(mean)} channels; set finetune.randaug_n=0")
        self.crop = PretrainAugment(size, scale=scale, ratio=ratio, hflip=True, mean=mean, std=std)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.randaug = RandAugment(n=cfg.randaug_n, m=cfg.randaug_m) if cfg.randaug_n else None
        self.erase = K.RandomErasing(p=cfg.reprob, value=0.0) if cfg.reprob else None

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        x = self.crop(images, generator)  # normalised
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if self.randaug is not None:
            x = (self.randaug((x * std + mean).clamp(0, 1)) - mean) / std
        return self.erase(x) if self.erase is not None else x  # erased pixels = 0 = the mean colour


def classifier(ctx: Context) -> VisionTransformer:
    """The encoder with a fresh head (N(0, 2e-5) truncated, as MAE), global pooling and drop path."""
    f = ctx.cfg.finetune
    model = vit_from(ctx.encoder, num_classes=ctx.num_classes, global_pool=f.global_pool, drop_path_rate=f.drop_path)
    if f.scratch:
        model.init_encoder()
        model.apply(init_weights)
    model.pos_embed.requires_grad_(True)  # fine-tuning trains the position embeddings (timm, MAE)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def run(ctx: Context, resume: str | None = None) -> dict:
    cfg, t, d = ctx.cfg, ctx.cfg.train, ctx.cfg.data
    torch.manual_seed(t.seed)
    model = classifier(ctx).to(ctx.device)
    optimizer = build_adamw(model, t.blr, t.weight_decay, t.betas, layer_decay=cfg.finetune.layer_decay)
    augment = FinetuneAugment(model.img_size, cfg.finetune, d.scale, d.ratio, d.mean, d.std)

    def loss_fn(module, batch, generator):
        images, targets = mix(augment(batch["images"].to(ctx.device), generator), batch["labels"].to(ctx.device),
                              ctx.num_classes, cfg.finetune, generator)
        return torch.sum(-targets * module(images).log_softmax(dim=-1), dim=-1).mean(), {}

    kind = "finetune_scratch" if cfg.finetune.scratch else "finetune"
    return train_classifier(ctx, model, loss_fn, optimizer, kind, resume)
