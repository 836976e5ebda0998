"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al., IJCV 2024).

The encoder (a ViT, parameters at the top level as in MAE) sees only the visible ~50% of patches.
A latent contextual regressor of cross-attention blocks predicts the encoder's latents of the masked
patches from the visible ones; those predictions are aligned (MSE) with what the encoder itself
computes on the masked patches alone, without gradient. A decoder then maps the predicted latents,
and only those, to the targets of the masked patches: DALL-E codes (cross-entropy, the paper's
setting) or pixels (MSE). The pretext task lives in the regressor and decoder, so that the encoder
alone carries the representation. Layout and behaviour follow the official Atten4Vis/CAE code
(`models/modeling_cae.py`, `modeling_cae_helper.py`); its checkpoints load via `mimkit.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, check_choice, check_nonneg, check_open_unit
from mimkit.masking import MASK_TYPES, gather_tokens, make_mask, num_kept, split_ids
from mimkit.models.vit import (
    LN_EPS,
    VIT_SIZES,
    Block,
    DropPath,
    EncoderConfig,
    LayerScale,
    Mlp,
    VisionTransformer,
    attention,
    check_width,
    init_weights,
    sincos_pos_embed_2d,
)
from mimkit.targets import pixel_target, token_target
from mimkit.tokenizers import TOKENIZERS, build_tokenizer

TARGETS = ("tokens", "pixels")


@dataclass
class CAEConfig(EncoderConfig):
    """CAE's model: the encoder's fields, then regressor, decoder, masking and targets."""

    qv_bias: bool = True
    """Query and value biases without a key bias in every attention (BEiT / official CAE)."""
    init_values: float = 0.1
    """LayerScale of the encoder blocks (CAE: 0.1 for ViT-B, 1e-5 for ViT-L; 0 = off)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the encoder, regressor and decoder (CAE: 0.1)."""
    decoder_embed_dim: int = 768
    """Width of regressor and decoder; a linear layer + LayerNorm maps the encoder's width to it if it differs."""
    decoder_num_heads: int = 12
    """Attention heads of regressor and decoder."""
    regressor_depth: int = 4
    """Cross-attention blocks of the latent contextual regressor (CAE: 4)."""
    decoder_depth: int = 4
    """Self-attention blocks of the decoder, which sees the masked patches only (CAE: 4)."""
    decoder_init_values: float = 0.1
    """LayerScale of regressor and decoder blocks (official `decoder_layer_scale_init_value`; 0 = off)."""
    mask_type: str = "block"
    """`block` (BEiT's rectangles, CAE's setting) or `random` (MAE's uniform masking)."""
    mask_ratio: float = 0.5
    """Fraction of patches hidden from the encoder: N - int(N * (1 - ratio)) masked (CAE: 98 of 196)."""
    mask_min_block: int = 0
    """Smallest block of a block mask in patches; 0 = BEiT's 16 of a 14 x 14 grid scaled to the grid's area."""
    mask_min_aspect: float = 0.3
    """Block aspect ratios h / w lie in [min_aspect, 1 / min_aspect] (BEiT / CAE: 0.3)."""
    align_weight: float = 2.0
    """Weight of the alignment MSE against the reconstruction loss (CAE: 2)."""
    target: str = "tokens"
    """`tokens` (codes of `tokenizer`, cross-entropy; CAE) or `pixels` (MSE, normalised per patch if norm_pix_loss)."""
    norm_pix_loss: bool = False
    """With target `pixels`: predict per-patch normalised pixels (MAE's norm-pix)."""
    tokenizer: str = "dalle"
    """With target `tokens`: the tokenizer (see `mimkit.tokenizers.TOKENIZERS`)."""
    tokenizer_weights: str = ""
    """With target `tokens`: a local path or URL of the tokenizer weights (DALL-E: encoder.pkl); `random` for tests."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """The normalisation the data pipeline applied, undone before tokenizing: in a run, data.mean (set that)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """The normalisation the data pipeline applied, undone before tokenizing: in a run, data.std (set that)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_width("model.decoder_embed_dim", self.decoder_embed_dim, "model.decoder_num_heads",
                    self.decoder_num_heads)
        for name in ("regressor_depth", "decoder_depth", "init_values", "decoder_init_values", "align_weight",
                     "mask_min_block"):
            check_nonneg(f"model.{name}", getattr(self, name))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: must be in [0, 1), got {self.drop_path_rate!r}")
        if not 0.0 < self.mask_min_aspect <= 1.0:
            raise ConfigError(f"model.mask_min_aspect: must be in (0, 1], got {self.mask_min_aspect!r}")
        check_open_unit("model.mask_ratio", self.mask_ratio)
        check_choice("model.mask_type", self.mask_type, MASK_TYPES)
        check_choice("model.target", self.target, TARGETS)
        check_choice("model.tokenizer", self.tokenizer, tuple(TOKENIZERS))
        if not all(v > 0 for v in self.image_std):
            raise ConfigError(f"model.image_std: every value must be > 0, got {list(self.image_std)}")


def _preset(size: str, patch: int = 16, img: int = 224, **kw) -> dict:
    base = VIT_SIZES[size]
    return dict(base, patch_size=patch, img_size=img, decoder_embed_dim=base["embed_dim"], **kw)


PRESETS = {
    # The official `cae_small_patch16_224` uses 12 heads of 32 channels (DeiT-S has 6).
    "cae_vit_small_patch16": _preset("small", num_heads=12, decoder_num_heads=12),
    "cae_vit_base_patch16": _preset("base", decoder_num_heads=12),
    "cae_vit_large_patch16": _preset("large", decoder_num_heads=16, init_values=1e-5, decoder_init_values=1e-5),
    # CIFAR-tiny: 32 px, patch 4 (8 x 8 grid), ViT-T encoder (192 x 12, 3 heads), 2 + 2 blocks of width 192
    # after it, pixel targets (no tokenizer exists for 4-pixel patches).
    "cae_vit_tiny_cifar_patch4": _preset("tiny", 4, img=32, decoder_num_heads=3, regressor_depth=2,
                                         decoder_depth=2, target="pixels", norm_pix_loss=True),
}


@dataclass
class CAEOutput:
    loss: Tensor
    """Scalar: reconstruction loss + align_weight * alignment loss."""
    pred: Tensor
    """(B, M, P) pixel predictions (norm-pix when `norm_pix_loss`) or (B, M, vocab) logits, for the masked
    patches only, in grid order (the order of `mask.nonzero()`)."""
    mask: Tensor
    """(B, N) bool, True = masked."""
    ids_restore: Tensor
    """(B, N) permutation from [visible, masked] (each in grid order) back to grid order."""
    latent_pred: Tensor
    """(B, M, Dd) the regressor's predicted latents of the masked patches."""
    latent_target: Tensor
    """(B, M, Dd) the encoder's own latents of the masked patches (no gradient): the alignment target."""
    logs: dict = field(default_factory=dict)
    """`loss_recon`, `loss_align` (unweighted MSE) and, for token targets, `acc` (detached scalars)."""


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, M, D) over keys and values (B, L, D): separate q / k / v
    projections without biases, plus BEiT's `q_bias` and `v_bias` (official `CrossAttention`)."""

    def __init__(self, dim: int, num_heads: int, qv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_q: Tensor, x_k: Tensor, x_v: Tensor) -> Tensor:
        B, M, D = x_q.shape

        def heads(x: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, D/H)
            return x.reshape(B, x.shape[1], self.num_heads, D // self.num_heads).transpose(1, 2)

        q = heads(F.linear(x_q, self.q.weight, self.q_bias))
        k = heads(F.linear(x_k, self.k.weight))
        v = heads(F.linear(x_v, self.v.weight, self.v_bias))
        x = attention(q, k, v)  # softmax(q k^T / sqrt(D/H)) v: (B, H, M, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, M, D))


class RegressorBlock(nn.Module):
    """One block of the latent contextual regressor (official `RegressorBlock`).

    Queries are the masked-token states plus the masked positions' embeddings; keys are the
    concatenation [visible latents, masked-token states] plus their positions; values are the same
    concatenation without positions. Each has its own LayerNorm. Then, as in the official code, the
    result is normalised (`norm2`) before the MLP *and* on the residual path.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_k = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_v = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = CrossAttention(dim, num_heads, qv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, kv: Tensor, pos_q: Tensor, pos_kv: Tensor) -> Tensor:
        """x (B, M, D) masked-token states, kv (B, K + M, D) = [visible, x]; positions alike."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm_q(x + pos_q), self.norm_k(kv + pos_kv), self.norm_v(kv))))
        x = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(x)))


def _trunc_normal_(t: Tensor, std: float = 0.02) -> None:
    """Official CAE's `trunc_normal_`: N(0, std) truncated at +-std (not +-2 std)."""
    nn.init.trunc_normal_(t, std=std, a=-std, b=std)


class CAE(VisionTransformer):
    def __init__(self, cfg: CAEConfig):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                         drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values or None, qv_bias=cfg.qv_bias)
        self.cfg = cfg
        D, Dd, N = cfg.embed_dim, cfg.decoder_embed_dim, self.patch_embed.num_patches
        # Official `encoder_to_regresser(_norm)`: only when the widths differ.
        self.encoder_to_regressor = nn.Linear(D, Dd) if Dd != D else nn.Identity()
        self.encoder_to_regressor_norm = nn.LayerNorm(Dd, eps=LN_EPS) if Dd != D else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        # One fixed sin-cos table for regressor and decoder (official `rd_pos_embed`).
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, N + 1, Dd), requires_grad=False)

        def rates(n: int) -> list[float]:
            return [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]

        self.regressor_blocks = nn.ModuleList(
            RegressorBlock(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qv_bias, r, cfg.decoder_init_values)
            for r in rates(cfg.regressor_depth)
        )
        self.regressor_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, drop_path=r, init_values=cfg.decoder_init_values or None,
                  qv_bias=cfg.qv_bias)
            for r in rates(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        out = TOKENIZERS[cfg.tokenizer].vocab_size if cfg.target == "tokens" else cfg.patch_size**2 * cfg.in_chans
        self.decoder_pred = nn.Linear(Dd, out)
        # The tokenizer is frozen and has weights of its own: kept out of the module tree (so out of
        # state_dict, parameters() and the optimizer) and built on first use.
        object.__setattr__(self, "_tokenizer", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official CAE init: xavier-uniform linear layers, unit LayerNorms, patch conv and tokens
        truncated N(0, 0.02), LayerScale at its init value, fixed sin-cos positions."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.decoder_embed_dim, grid).unsqueeze(0))
        self.apply(init_weights)
        _trunc_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        _trunc_normal_(self.cls_token)
        _trunc_normal_(self.mask_token)

    # ------------------------------------------------------------------ the algorithm, step by step

    def masking(self, imgs: Tensor, mask: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids_keep (B, K), ids_masked (B, M), ids_restore (B, N), mask (B, N)); an explicit `mask`
        (official `bool_masked_pos`) must hide the same number of patches in every image."""
        B, N = imgs.shape[0], self.patch_embed.num_patches
        if mask is None:
            num_masked = N - num_kept(N, self.cfg.mask_ratio)
            _, _, mask = make_mask(self.cfg.mask_type, B, self.patch_embed.grid_size, self.cfg.mask_ratio,
                                   noise=noise, generator=generator, device=imgs.device,
                                   min_block=self.cfg.mask_min_block or None, min_aspect=self.cfg.mask_min_aspect)
        else:
            counts = mask.sum(1)
            if mask.shape != (B, N) or mask.dtype != torch.bool or bool((counts != counts[0]).any()):
                raise ValueError(f"mask must be a ({B}, {N}) bool tensor with the same count in every row")
            num_masked = int(counts[0])
        ids_keep, ids_masked = split_ids(mask, num_masked)
        return ids_keep, ids_masked, torch.argsort(torch.cat([ids_keep, ids_masked], 1), dim=1), mask

    def to_regressor(self, x: Tensor) -> Tensor:
        """Encoder width -> regressor width (identity when they agree): (B, L, D) -> (B, L, Dd)."""
        return self.encoder_to_regressor_norm(self.encoder_to_regressor(x))

    @torch.no_grad()
    def alignment_target(self, imgs: Tensor, ids_masked: Tensor) -> Tensor:
        """The encoder's latents of the masked patches, computed on those patches alone: (B, M, Dd).

        The official code keeps a second encoder whose parameters are overwritten with the encoder's
        before every use (a copy, not an EMA); running the encoder itself without gradient is the same
        computation, with no second copy in memory or in checkpoints. Stochastic depth is active in
        training, as it is for the official copy.
        """
        return self.to_regressor(self.forward_encoder(imgs, ids_masked)[:, 1:])

    def forward_regressor(self, latent: Tensor, ids_keep: Tensor, ids_masked: Tensor) -> Tensor:
        """Predict the masked patches' latents from the visible ones: (B, 1 + K, D) -> (B, M, Dd)."""
        visible = self.to_regressor(latent)[:, 1:]  # drop cls: (B, K, Dd)
        B, M = ids_masked.shape
        pos = self.decoder_pos_embed[:, 1:].expand(B, -1, -1)  # (B, N, Dd)
        pos_visible, pos_masked = gather_tokens(pos, ids_keep), gather_tokens(pos, ids_masked)
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)  # (B, K + M, Dd)
        x = self.mask_token.expand(B, M, -1)  # (B, M, Dd)
        for blk in self.regressor_blocks:
            x = blk(x, torch.cat([visible, x], dim=1), pos_masked, pos_kv)
        return self.regressor_norm(x)

    def forward_decoder(self, latent_pred: Tensor, ids_masked: Tensor) -> Tensor:
        """Predicted latents plus their positions, self-attention among the masked patches only, head:
        (B, M, Dd) -> (B, M, P) pixels or (B, M, vocab) logits."""
        pos = self.decoder_pos_embed[:, 1:].expand(latent_pred.shape[0], -1, -1)
        x = latent_pred + gather_tokens(pos, ids_masked)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: Tensor, pred: Tensor, ids_masked: Tensor) -> tuple[Tensor, dict]:
        """Reconstruction loss on the masked patches: cross-entropy on codes, or MSE on (norm-)pixels."""
        if self.cfg.target == "tokens":
            codes = token_target(imgs, self.tokenizer(), self.patch_embed.grid_size, self.cfg.image_mean,
                                 self.cfg.image_std)
            labels = torch.gather(codes, 1, ids_masked)  # (B, M)
            loss = F.cross_entropy(pred.float().flatten(0, 1), labels.flatten())
            return loss, {"acc": (pred.detach().argmax(-1) == labels).float().mean()}
        target = gather_tokens(pixel_target(imgs, self.patch_size, self.cfg.norm_pix_loss), ids_masked)
        return F.mse_loss(pred.float(), target.float()), {}

    def forward(self, imgs: Tensor, mask: Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> CAEOutput:
        """Mask, encode the visible patches, regress the masked latents, align, decode, score.
        The mask is `mask`, or drawn from `generator` (`noise` fixes a random mask, as in MAE)."""
        ids_keep, ids_masked, ids_restore, mask = self.masking(imgs, mask, noise, generator)
        latent = self.forward_encoder(imgs, ids_keep)
        latent_target = self.alignment_target(imgs, ids_masked)
        latent_pred = self.forward_regressor(latent, ids_keep, ids_masked)
        pred = self.forward_decoder(latent_pred, ids_masked)
        loss_recon, logs = self.forward_loss(imgs, pred, ids_masked)
        loss_align = F.mse_loss(latent_pred.float(), latent_target.float())
        loss = loss_recon + self.cfg.align_weight * loss_align
        logs = {"loss_recon": loss_recon.detach(), "loss_align": loss_align.detach(), **logs}
        return CAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore, latent_pred=latent_pred,
                         latent_target=latent_target, logs=logs)

    # ------------------------------------------------------------------ tokenizer, metadata, export

    def tokenizer(self) -> nn.Module:
        """The frozen tokenizer on the images' device, built from `tokenizer_weights` on first use."""
        if self._tokenizer is None:
            self.set_tokenizer(build_tokenizer(self.cfg.tokenizer, self.cfg.tokenizer_weights))
        device = self.decoder_pred.weight.device
        if next(self._tokenizer.parameters()).device != device:
            self._tokenizer.to(device)
        return self._tokenizer

    def set_tokenizer(self, tokenizer: nn.Module) -> None:
        """Use an already built tokenizer (frozen here; never saved with the model)."""
        object.__setattr__(self, "_tokenizer", tokenizer.eval().requires_grad_(False))

    def no_weight_decay(self) -> set[str]:
        # The official top-level model declares no exemptions, so its cls and mask tokens are decayed;
        # the position tables are fixed anyway.
        return {"pos_embed", "decoder_pos_embed"}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights alone, under timm names (what evaluation and export keep)."""
        drop = ("regressor_", "decoder_", "mask_token", "encoder_to_regressor")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(drop)}
