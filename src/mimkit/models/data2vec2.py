"""data2vec 2.0 (Baevski et al., ICML 2023; fairseq `examples/data2vec`, `base_images_only_task.yaml`).

An EMA teacher runs once on the whole image; its target for every patch is the average of the top-K
blocks' feed-forward outputs (before the residual), each instance-normalised over the patches, then
layer-normalised (`make_targets`). The student encoder runs on `num_masks` masked views of each image
(multi-mask, fairseq's `clone_batch`): inverse block masks, 80% hidden, the visible 20% in 3 x 3
blocks (`masking.inverse_block_mask`). A light convolutional decoder (grouped 3 x 3 convolutions,
LayerNorm, GELU, residual; `Decoder2d`) fills the hidden positions with N(0, 0.01) noise tokens,
restores the grid and predicts the targets; L2 on the hidden patches, scaled by 1 / sqrt(D), plus
`cls_loss` times the L2 between the student's cls token and the mean target of the image, summed over
the views (as the official loss is before fairseq divides by the number of hidden patches).

The teacher decays from `ema[0]` to `ema[1]` over the first `ema_anneal` of the run, then stays
(fairseq's `get_annealed_rate`); it follows the student after every optimizer step (`after_step`)
and is a submodule without gradients, so it is in the checkpoint and resumes exactly. Evaluation and
export use the student encoder, as data2vec fine-tunes it.

One deviation: the backbone is mimkit's pre-norm ViT (timm / MAE layout); the official image model
is post-norm with two modality-specific blocks before ten shared ones. The targets are still the
top-K blocks' FFN outputs (here of the pre-norm blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.config import ConfigError, check_nonneg, check_open_unit, check_positive, check_range
from mimkit.device import to_device
from mimkit.masking import gather_tokens, ids_from_mask, inverse_block_mask
from mimkit.models.vit import VIT_SIZES, EncoderConfig, VisionTransformer, bert_init, copy_to_teacher, ema_update


@dataclass
class Data2Vec2Config(EncoderConfig):
    """data2vec 2.0's model: the encoder's fields, then the masks', the targets', the decoder's and the EMA's."""

    mask_ratio: float = 0.8
    """Fraction of the patches hidden from the student."""
    mask_block: int = 3
    """Side of the blocks the visible patches come in."""
    mask_adjust: float = 0.07
    """Extra block centres drawn, as a fraction of the patches (fairseq's `mask_prob_adjust`)."""
    num_masks: int = 16
    """Masked views of each image per step, sharing one teacher pass (fairseq's `clone_batch`)."""
    average_top_k: int = 10
    """Teacher blocks whose FFN outputs are averaged into the target."""
    decoder_dim: int = 768
    """Width of the convolutional decoder."""
    decoder_layers: int = 6
    """Convolutions of the decoder."""
    decoder_kernel: int = 3
    """Kernel side of the decoder's convolutions."""
    decoder_groups: int = 16
    """Groups of the decoder's convolutions."""
    mask_noise_std: float = 0.01
    """Std of the noise tokens the decoder gets at hidden positions."""
    cls_loss: float = 0.01
    """Weight of the cls token's regression onto the image's mean target."""
    ema: tuple[float, float] = (0.9998, 0.99999)
    """Teacher decay at the first step and from the end of the anneal on."""
    ema_anneal: float = 0.2665
    """Fraction of the run over which the decay rises (official: 100k of 375.3k updates)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_open_unit("model.mask_ratio", self.mask_ratio)
        for key in ("mask_block", "num_masks", "average_top_k", "decoder_dim", "decoder_layers", "decoder_kernel",
                    "decoder_groups"):
            check_positive(f"model.{key}", getattr(self, key))
        check_nonneg("model.cls_loss", self.cls_loss)
        check_nonneg("model.mask_noise_std", self.mask_noise_std)
        check_range("model.ema", self.ema, 0.0, 1.0)
        if not 0 < self.ema_anneal <= 1:
            raise ConfigError(f"model.ema_anneal: must be in (0, 1], got {self.ema_anneal!r}")
        if self.average_top_k > self.depth:
            raise ConfigError(f"model.average_top_k: {self.average_top_k} is more than model.depth={self.depth}")
        for key, width in (("model.embed_dim", self.embed_dim), ("model.decoder_dim", self.decoder_dim)):
            if width % self.decoder_groups:
                raise ConfigError(f"{key}: {width} is not divisible by model.decoder_groups={self.decoder_groups}")


PRESETS = {
    "data2vec2_vit_base_patch16": dict(VIT_SIZES["base"], patch_size=16, img_size=224),
    # CIFAR-tiny: 32 px, patch 4 (8 x 8 grid), ViT-T; a 192-wide, 3-layer decoder, 4 views per image.
    "data2vec2_vit_tiny_cifar_patch4": dict(VIT_SIZES["tiny"], patch_size=4, img_size=32, decoder_dim=192,
                                            decoder_layers=3, num_masks=4),
}


@dataclass
class Data2Vec2Output:
    loss: Tensor
    """Scalar: regression of the hidden patches plus the weighted cls term."""
    mask: Tensor
    """(B, N) bool, True = hidden from the student in the first view of each image (what pictures show)."""
    views: Tensor | None = None
    """(B * num_masks, N) bool: every view's mask, view j of image i at row i * num_masks + j."""
    pred: Tensor | None = None
    """No pixels are predicted (pictures show the masks only)."""
    logs: dict = field(default_factory=dict)
    """The regression and cls terms."""


class Decoder2d(nn.Module):
    """fairseq's `Decoder2d`: grouped k x k convolutions, each followed by a LayerNorm over the channels
    (no affine) and GELU, with a residual around every layer whose width matches; a linear projection
    back to the encoder's width. (B, N, D) on an h x w grid -> (B, N, D)."""

    def __init__(self, cfg: Data2Vec2Config, grid: tuple[int, int]):
        super().__init__()
        self.grid, k = grid, cfg.decoder_kernel
        self.convs = nn.ModuleList(nn.Conv2d(cfg.embed_dim if i == 0 else cfg.decoder_dim, cfg.decoder_dim, k,
                                             padding=k // 2, groups=cfg.decoder_groups)
                                   for i in range(cfg.decoder_layers))
        self.proj = nn.Linear(cfg.decoder_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        x = x.transpose(1, 2).reshape(B, D, *self.grid)
        for conv in self.convs:
            y = conv(x)
            y = y[..., : x.shape[-2], : x.shape[-1]]  # SamePad2d: an even kernel's extra row and column
            y = F.gelu(F.layer_norm(y.movedim(1, -1), (y.shape[1],)).movedim(-1, 1))
            x = y + x if y.shape == x.shape else y
        return self.proj(x.flatten(2).transpose(1, 2))


class Data2Vec2(VisionTransformer):
    def __init__(self, cfg: Data2Vec2Config):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
        self.cfg = cfg
        self.decoder = Decoder2d(cfg, self.patch_embed.grid_size)
        self.teacher = VisionTransformer(**self.arch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's initialisation: BERT's N(0, 0.02) linear weights with zero biases in the blocks (the
        patch embedding, cls token and fixed sin-cos positions as in MAE), PyTorch's defaults in the
        decoder (its `reset_parameters`); the teacher starts as a copy of the student, without gradients."""
        self.init_encoder()
        for module in (*self.blocks, self.norm):
            module.apply(bert_init)
        self.reset_teacher()

    teacher_module = "teacher"

    def reset_teacher(self) -> None:
        """The teacher set to the student's weights, without gradients."""
        copy_to_teacher(self.teacher, self)

    @torch.no_grad()
    def targets(self, imgs: Tensor) -> Tensor:
        """The teacher's target for every patch (B, N, D): the top-K blocks' FFN outputs, each instance-
        normalised over the patches, averaged, layer-normalised."""
        t = self.teacher
        x = t.with_cls(t.embed(imgs))
        layers = []
        for blk in t.blocks:
            x, ffn = blk.with_ffn(x)
            layers.append(ffn[:, 1:])
        top = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layers[-self.cfg.average_top_k :]]
        y = torch.stack(top).mean(0)
        return F.layer_norm(y, y.shape[-1:])

    def make_mask(self, batch: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
        """(batch, N) bool inverse block masks (`masking.inverse_block_mask`), True = hidden."""
        c = self.cfg
        return inverse_block_mask(batch, self.patch_embed.grid_size, c.mask_ratio, c.mask_block, c.mask_adjust,
                                  generator=generator, device=device)

    def decode(self, latent: Tensor, ids_restore: Tensor, noise: Tensor) -> Tensor:
        """`noise` (V, M, D) tokens at the hidden positions, grid order restored, the decoder:
        (V, 1 + K, D) -> (V, N, D)."""
        return self.decoder(gather_tokens(torch.cat([latent[:, 1:], noise.to(latent)], dim=1), ids_restore))

    def forward(self, imgs: Tensor, generator: torch.Generator | None = None, mask: Tensor | None = None,
                noise: Tensor | None = None) -> Data2Vec2Output:
        """One teacher pass, `num_masks` student views per image: masks (or `mask`, (B * num_masks, N) bool)
        and the decoder's noise tokens (or `noise`, (B * num_masks, M, D)) drawn from `generator`."""
        c, B = self.cfg, imgs.shape[0]
        V = B * c.num_masks
        mask = mask if mask is not None else self.make_mask(V, generator, imgs.device)
        num_masked = int(mask[0].sum())
        ids_keep, ids_restore, mask = ids_from_mask(mask, num_masked)
        y = self.targets(imgs).repeat_interleave(c.num_masks, 0)  # (V, N, D), as fairseq clones the batch
        tokens = self.embed(imgs).repeat_interleave(c.num_masks, 0)  # one patch embedding per image
        latent = self.run_blocks(self.with_cls(gather_tokens(tokens, ids_keep)))  # (V, 1 + K, D)
        if noise is None:
            gen_device = generator.device if generator is not None else imgs.device
            noise = to_device(c.mask_noise_std * torch.randn(V, num_masked, latent.shape[-1], generator=generator,
                                                             device=gen_device), imgs.device)
        pred = self.decode(latent, ids_restore, noise)
        scale = 1 / math.sqrt(y.shape[-1])
        regression = (((pred.float() - y) ** 2) * mask[..., None]).sum() * scale / mask.sum()  # no host sync
        cls = ((latent[:, 0].float() - y.mean(dim=1)) ** 2).sum() * scale
        loss = regression + c.cls_loss * cls
        return Data2Vec2Output(loss=loss, mask=mask[:: c.num_masks], views=mask,
                               logs={"regression": regression.detach(), "cls": cls.detach()})

    def decay(self, step: int, total_steps: int) -> float:
        """The teacher's decay after optimizer step `step` (1-based): fairseq's `get_annealed_rate`."""
        start, end = self.cfg.ema
        anneal = max(1, round(self.cfg.ema_anneal * total_steps))
        return end if step >= anneal else end - (end - start) * (1 - step / anneal)

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher towards the student (`vit.ema_update`)."""
        ema_update(self.teacher, self, self.decay(step, total_steps))

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The student encoder's weights under timm names (what evaluation and export keep)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder.", "teacher."))}
