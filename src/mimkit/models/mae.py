"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

The encoder (a ViT, parameters at the top level as in the official `models_mae.py`) sees only
the visible ~25% of patches, with no mask tokens; a light decoder gets the encoded tokens plus a
shared mask token, adds its own fixed sin-cos positions, and predicts the pixels of every patch;
the loss is the MSE on the masked patches only, optionally on per-patch normalised pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mimkit.config import check_choice, check_nonneg, check_open_unit
from mimkit.masking import MASK_TYPES, gather_tokens, make_mask
from mimkit.models.vit import (
    LN_EPS,
    VIT_SIZES,
    Block,
    EncoderConfig,
    VisionTransformer,
    check_width,
    init_weights,
    sincos_pos_embed_2d,
)
from mimkit.targets import pixel_target


@dataclass
class MAEConfig(EncoderConfig):
    """MAE's model: the encoder's fields, then the decoder's and the masking's."""

    decoder_embed_dim: int = 512
    """Decoder width (MAE: 512 is best)."""
    decoder_depth: int = 8
    """Decoder blocks (MAE: 8 for linear probing, 1 is enough for fine-tuning)."""
    decoder_num_heads: int = 16
    """Decoder attention heads."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder (MAE: 0.75)."""
    norm_pix_loss: bool = False
    """Predict per-patch normalised pixels (MAE's best setting for fine-tuning and linear probing)."""
    mask_type: str = "random"
    """`random` (MAE: uniform per image) or `block` (BEiT / CAE rectangles; MAE's ablation: worse for MAE)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width("model.decoder_embed_dim", self.decoder_embed_dim, "model.decoder_num_heads",
                    self.decoder_num_heads)
        check_nonneg("model.decoder_depth", self.decoder_depth)
        check_open_unit("model.mask_ratio", self.mask_ratio)
        check_choice("model.mask_type", self.mask_type, MASK_TYPES)


def _preset(size: str, patch: int, img: int = 224, decoder: tuple[int, int, int] = (512, 8, 16)) -> dict:
    d_dim, d_depth, d_heads = decoder
    return dict(VIT_SIZES[size], patch_size=patch, img_size=img, decoder_embed_dim=d_dim,
                decoder_depth=d_depth, decoder_num_heads=d_heads)


PRESETS = {
    "mae_vit_tiny_patch16": _preset("tiny", 16),
    "mae_vit_small_patch16": _preset("small", 16),
    "mae_vit_base_patch16": _preset("base", 16),
    "mae_vit_large_patch16": _preset("large", 16),
    "mae_vit_huge_patch16": _preset("huge", 16),
    "mae_vit_huge_patch14": _preset("huge", 14),
    # CIFAR-tiny: 32 px, ViT-T encoder (192 x 12, 3 heads), decoder 128 x 4.
    "mae_vit_tiny_cifar_patch4": _preset("tiny", 4, img=32, decoder=(128, 4, 4)),
    "mae_vit_tiny_cifar_patch2": _preset("tiny", 2, img=32, decoder=(128, 4, 4)),
}


@dataclass
class MAEOutput:
    loss: Tensor
    """Scalar MSE over masked patches."""
    pred: Tensor
    """(B, N, P) predictions for every patch, in target space (norm-pix when `norm_pix_loss`)."""
    mask: Tensor
    """(B, N) bool, True = masked."""
    ids_restore: Tensor
    """(B, N) permutation from [kept, masked] back to grid order."""
    logs: dict = field(default_factory=dict)
    """Extra scalars (tensors) to log."""


class MAE(VisionTransformer):
    def __init__(self, cfg: MAEConfig):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
        self.cfg = cfg
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE `initialize_weights`."""
        self.init_encoder()
        grid = self.patch_embed.grid_size
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.decoder_embed_dim, grid).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Mask tokens fill the hidden slots, grid order is restored: (B, 1 + K, D) -> (B, N, P)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N - (x.shape[1] - 1), -1)  # (B, M, Dd)
        tokens = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)  # (B, N, Dd)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop cls: (B, N, P)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over masked patches only."""
        target = pixel_target(imgs, self.patch_size, self.cfg.norm_pix_loss)
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Mask, encode, decode, score. `noise` (B, N) fixes the mask; else it is drawn from `generator`."""
        ids_keep, ids_restore, mask = make_mask(self.cfg.mask_type, imgs.shape[0], self.patch_embed.grid_size,
                                                self.cfg.mask_ratio, noise=noise, generator=generator,
                                                device=imgs.device)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights alone, under timm names (what evaluation and export keep)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
