"""I-JEPA (Assran et al., CVPR 2023; facebookresearch/ijepa): predict representations, not pixels.

A context encoder (the backbone) sees one large context block of patches, the target blocks removed;
a narrow predictor ViT takes its tokens plus a mask token at the position of every patch of each of
4 target blocks and predicts what the target encoder, an EMA of the context encoder applied to the
whole image, gives there (layer-normalised over the width). L2 loss (the paper; `loss: smooth_l1` is
the official code's). Multi-block masks: `masking.multiblock_masks`. No pixel is reconstructed and
no augmentation beyond the crop is used (the recipes turn the flip off).

The target encoder follows the context encoder after every optimizer step (`after_step`, which the
training loop calls for any method that has it): t <- m t + (1 - m) s, the momentum m rising linearly
from `ema[0]` to `ema[1]` over the run, as the official schedule does. It is a submodule without
gradients, so it is in the checkpoint and resumes exactly. Evaluation, export and the kNN monitor use
the target encoder (`forward_features`, `encoder_state_dict`), as the paper evaluates it.

One deviation: the shared backbone keeps its cls token (zero position row, as in MAE), in the context
and the target encoder alike, so that evaluation sees the encoder as it was trained; the official ViT
has none. Targets and predictions are patch tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.config import check_choice, check_positive, check_range
from mimkit.masking import gather_tokens, multiblock_masks
from mimkit.models.vit import (
    LN_EPS,
    VIT_SIZES,
    Block,
    EncoderConfig,
    VisionTransformer,
    check_width,
    copy_to_teacher,
    ema_update,
    rescale_blocks,
    sincos_pos_embed_2d,
    trunc_normal_init,
)

LOSSES = ("l2", "smooth_l1")


@dataclass
class IJEPAConfig(EncoderConfig):
    """I-JEPA's model: the encoder's fields, then the predictor's, the masks' and the EMA's."""

    predictor_embed_dim: int = 384
    """Predictor width (official ViT-H: 384)."""
    predictor_depth: int = 12
    """Predictor blocks (official: 12)."""
    predictor_num_heads: int = 12
    """Predictor attention heads (official: the encoder's)."""
    num_targets: int = 4
    """Target blocks per image."""
    target_scale: tuple[float, float] = (0.15, 0.2)
    """Area of a target block, as a fraction of the image."""
    target_aspect: tuple[float, float] = (0.75, 1.5)
    """Aspect ratio (height / width) of a target block, uniform in this range."""
    context_scale: tuple[float, float] = (0.85, 1.0)
    """Area of the (square) context block before the targets are removed from it."""
    min_keep: int = 10
    """A context keeps more than this many patches."""
    ema: tuple[float, float] = (0.996, 1.0)
    """Momentum of the target encoder, from the first to the last step (linear)."""
    loss: str = "l2"
    """`l2` (the paper) or `smooth_l1` (the official code)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width("model.predictor_embed_dim", self.predictor_embed_dim, "model.predictor_num_heads",
                    self.predictor_num_heads)
        check_positive("model.predictor_depth", self.predictor_depth)
        check_positive("model.num_targets", self.num_targets)
        for key in ("target_scale", "context_scale", "ema"):
            check_range(f"model.{key}", getattr(self, key), 0.0, 1.0)
        check_range("model.target_aspect", self.target_aspect, 1e-6, float("inf"))
        check_choice("model.loss", self.loss, LOSSES)


def _preset(size: str, patch: int, img: int, **kw) -> dict:
    return dict(VIT_SIZES[size], patch_size=patch, img_size=img, predictor_num_heads=VIT_SIZES[size]["num_heads"],
                **kw)


PRESETS = {
    "ijepa_vit_base_patch16": _preset("base", 16, 224, predictor_embed_dim=384, predictor_depth=12),
    "ijepa_vit_large_patch16": _preset("large", 16, 224, predictor_embed_dim=384, predictor_depth=12),
    "ijepa_vit_huge_patch14": _preset("huge", 14, 224, predictor_embed_dim=384, predictor_depth=12),
    # CIFAR-tiny: 32 px, patch 4 (8 x 8 grid), ViT-T encoder; a 96-wide, 4-deep predictor.
    "ijepa_vit_tiny_cifar_patch4": _preset("tiny", 4, 32, predictor_embed_dim=96, predictor_depth=4),
}


@dataclass
class IJEPAOutput:
    loss: Tensor
    """Scalar L2 (or smooth L1) between predicted and target representations of the target patches."""
    mask: Tensor
    """(B, N) bool, True = not in the context (hidden from the context encoder)."""
    pred: Tensor | None = None
    """No pixels are predicted (pictures show the masks only)."""
    logs: dict = field(default_factory=dict)
    """Extra scalars (tensors) to log."""


class IJEPA(VisionTransformer):
    def __init__(self, cfg: IJEPAConfig):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
        self.cfg = cfg
        D, Dp = cfg.embed_dim, cfg.predictor_embed_dim
        self.predictor_embed = nn.Linear(D, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, Dp), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(Dp, cfg.predictor_num_heads, cfg.mlp_ratio)
                                              for _ in range(cfg.predictor_depth))
        self.predictor_norm = nn.LayerNorm(Dp, eps=LN_EPS)
        self.predictor_proj = nn.Linear(Dp, D)
        self.target_encoder = VisionTransformer(**self.arch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: truncated N(0, 0.02) weights, BEiT's depth rescale, fixed sin-cos positions; the
        target encoder starts as a copy of the context encoder."""
        self.apply(trunc_normal_init)
        rescale_blocks(self.blocks)
        rescale_blocks(self.predictor_blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size).unsqueeze(0))
        grid = self.patch_embed.grid_size
        self.predictor_pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.predictor_embed_dim, grid, cls_token=False))
        self.reset_teacher()

    teacher_module = "target_encoder"

    def reset_teacher(self) -> None:
        """The target encoder set to the context encoder's weights, without gradients."""
        copy_to_teacher(self.target_encoder, self)

    def make_masks(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(context ids (B, Kc), target ids (num_targets, B, Kt)): `masking.multiblock_masks`."""
        c = self.cfg
        return multiblock_masks(batch, self.patch_embed.grid_size, num_targets=c.num_targets,
                                target_scale=c.target_scale, target_aspect=c.target_aspect,
                                context_scale=c.context_scale, min_keep=c.min_keep, generator=generator, device=device)

    def predict(self, context: Tensor, context_ids: Tensor, target_ids: Tensor) -> Tensor:
        """The predictor: context tokens (B, Kc, D) at `context_ids` and mask tokens at each target block's
        positions (T, B, Kt) -> predicted representations (T * B, Kt, D), blocks stacked target-major."""
        T, B = target_ids.shape[:2]
        pos = self.predictor_pos_embed.expand(B, -1, -1)  # (B, N, Dp)
        x = self.predictor_embed(context) + gather_tokens(pos, context_ids)  # (B, Kc, Dp)
        queries = self.mask_token + torch.cat([gather_tokens(pos, ids) for ids in target_ids])  # (T * B, Kt, Dp)
        x = torch.cat([x.repeat(T, 1, 1), queries], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x)[:, context.shape[1] :])

    @torch.no_grad()
    def targets(self, imgs: Tensor, target_ids: Tensor) -> Tensor:
        """The target encoder on the whole image, layer-normalised over the width, at each target block's
        patches: (T * B, Kt, D)."""
        h = self.target_encoder.forward_features(imgs)[:, 1:]  # (B, N, D), cls dropped
        h = F.layer_norm(h, (h.shape[-1],))
        return torch.cat([gather_tokens(h, ids) for ids in target_ids])

    def forward(self, imgs: Tensor, generator: torch.Generator | None = None,
                masks: tuple[Tensor, Tensor] | None = None) -> IJEPAOutput:
        """Draw the masks (or take `masks`: context ids, target ids), encode the context, predict the targets."""
        context_ids, target_ids = masks if masks is not None else self.make_masks(imgs.shape[0], generator, imgs.device)
        target = self.targets(imgs, target_ids)
        context = self.forward_encoder(imgs, context_ids)[:, 1:]  # (B, Kc, D)
        pred = self.predict(context, context_ids, target_ids)
        loss = (F.mse_loss if self.cfg.loss == "l2" else F.smooth_l1_loss)(pred.float(), target.float())
        mask = torch.ones(imgs.shape[0], self.patch_embed.num_patches, dtype=torch.bool, device=imgs.device)
        mask.scatter_(1, context_ids, False)
        return IJEPAOutput(loss=loss, mask=mask)

    def momentum(self, step: int, total_steps: int) -> float:
        """The EMA momentum after optimizer step `step` (1-based) of `total_steps`: linear from ema[0]."""
        lo, hi = self.cfg.ema
        return lo + (step - 1) * (hi - lo) / max(total_steps, 1)

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the target encoder towards the context encoder: t <- m t + (1 - m) s (`vit.ema_update`)."""
        ema_update(self.target_encoder, self, self.momentum(step, total_steps))

    def forward_features(self, imgs: Tensor) -> Tensor:
        """The target encoder's tokens (what I-JEPA evaluates): (B, C, H, W) -> (B, 1 + N, D)."""
        return self.target_encoder.forward_features(imgs)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "predictor_pos_embed"}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The target encoder's weights under timm names (what evaluation and export keep)."""
        return dict(self.target_encoder.state_dict())
