"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022), on a ViT.

The encoder sees every patch: the embeddings of masked patches are replaced by one learnable mask
token before the position embeddings are added. A one-layer head (a 1x1 convolution to p*p*C values
per patch, then pixel shuffle) predicts raw pixels, and the loss is the L1 distance on the masked
pixels only, divided by the channel count. Masks hide random blocks of `mask_patch_size` pixels
(SimMIM: 32 x 32 at ratio 0.6). Position embeddings are learned, as in transformers'
`ViTForMaskedImageModeling` (SimMIM on a ViT), with which this model agrees to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.config import ConfigError, check_open_unit, size_pair
from mimkit.masking import block_random_mask
from mimkit.models.vit import VIT_SIZES, EncoderConfig, VisionTransformer, rescale_blocks, trunc_normal_init
from mimkit.targets import patchify


@dataclass
class SimMIMConfig(EncoderConfig):
    """SimMIM's model: the encoder's fields, then the masking's."""

    mask_patch_size: int = 32
    """Side in pixels of the square blocks that are masked together (SimMIM: 32); a multiple of patch_size."""
    mask_ratio: float = 0.6
    """Fraction of the blocks masked (SimMIM: 0.6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_open_unit("model.mask_ratio", self.mask_ratio)
        if self.mask_patch_size < self.patch_size or self.mask_patch_size % self.patch_size:
            raise ConfigError(f"model.mask_patch_size: must be a multiple of model.patch_size ({self.patch_size}), "
                              f"got {self.mask_patch_size}")
        if any(side % self.mask_patch_size for side in size_pair(self.img_size)):
            raise ConfigError(f"model.mask_patch_size: {self.mask_patch_size} does not divide model.img_size "
                              f"{self.img_size}")


PRESETS = {
    "simmim_vit_base_patch16": dict(VIT_SIZES["base"], patch_size=16, img_size=224, mask_patch_size=32),
    "simmim_vit_large_patch16": dict(VIT_SIZES["large"], patch_size=16, img_size=224, mask_patch_size=32),
    # CIFAR-tiny: 32 px, patch 4 (8 x 8 grid), ViT-T; blocks of 8 px, i.e. 4 x 4 blocks of 2 x 2 patches.
    "simmim_vit_tiny_cifar_patch4": dict(VIT_SIZES["tiny"], patch_size=4, img_size=32, mask_patch_size=8),
}


@dataclass
class SimMIMOutput:
    loss: Tensor
    """Scalar L1 over masked pixels, divided by the channel count."""
    pred: Tensor
    """(B, N, P) predicted pixels of every patch (normalised image space)."""
    mask: Tensor
    """(B, N) bool, True = masked (replaced by the mask token)."""
    logs: dict = field(default_factory=dict)
    """Extra scalars (tensors) to log."""


class SimMIM(VisionTransformer):
    def __init__(self, cfg: SimMIMConfig):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
        self.cfg = cfg
        self.pos_embed.requires_grad_(True)  # learned (the backbone's are fixed sin-cos)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.decoder_pred = nn.Conv2d(cfg.embed_dim, cfg.patch_size**2 * cfg.in_chans, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(trunc_normal_init)
        rescale_blocks(self.blocks)

    def make_mask(self, batch: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
        """(B, N) bool: `mask_ratio` of the mask_patch_size blocks of each image, drawn from `generator`."""
        return block_random_mask(batch, self.patch_embed.grid_size, self.cfg.mask_patch_size // self.patch_size,
                                 self.cfg.mask_ratio, generator=generator, device=device)

    def forward(self, imgs: Tensor, mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> SimMIMOutput:
        """Mask (or take `mask`, (B, N) bool), encode every token, predict pixels, score the masked ones."""
        B, C, H, W = imgs.shape
        p, (h, w) = self.patch_size, self.patch_embed.grid_size
        if mask is None:
            mask = self.make_mask(B, generator, imgs.device)
        x = self.patch_embed(imgs)  # (B, N, D)
        m = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        x = self.run_blocks(self.with_cls(x + self.pos_embed[:, 1:]))[:, 1:]  # (B, N, D)
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        rec = F.pixel_shuffle(self.decoder_pred(x), p)  # (B, C, H, W)
        pixel_mask = mask.view(B, 1, h, 1, w, 1).expand(B, 1, h, p, w, p).reshape(B, 1, H, W).type_as(rec)
        l1 = F.l1_loss(imgs.float(), rec.float(), reduction="none")
        loss = (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / C
        return SimMIMOutput(loss=loss, pred=patchify(rec, p), mask=mask)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights alone, under timm names (what evaluation and export keep)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
