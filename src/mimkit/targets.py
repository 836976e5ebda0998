"""What a masked image model predicts for each patch: pixels, per-patch normalised pixels, or the
discrete code of a frozen tokenizer (BEiT / CAE; see `mimkit.tokenizers`).

Patch vectors are laid out (p, q, c), channels last, as in MAE's `patchify`, so that official
decoder heads and transformers' ViTMAE predictions line up value for value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_PIX_EPS = 1e-6  # MAE: (x - mean) / sqrt(var + 1e-6)


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P) with P = p * p * C laid out (p, q, c)."""
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(x: Tensor, p: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(B, N, P) -> (B, C, H, W), C = P / (p * p); the inverse of `patchify` for a grid of h x w patches
    (None: square)."""
    B, N, P = x.shape
    if grid is None:
        side = int(round(N**0.5))
        if side * side != N:
            raise ValueError(f"unpatchify needs the grid of {N} patches that are not a square")
        grid = (side, side)
    h, w = grid
    if h * w != N or P % (p * p):
        raise ValueError(f"{N} patches of {P} values are not a {h} x {w} grid of {p} x {p} patches")
    C = P // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and unbiased variance over the P values: (B, N, P) -> two (B, N, 1)."""
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


def pixel_target(imgs: Tensor, p: int, norm_pix: bool) -> Tensor:
    """Regression target (B, N, P): raw (normalised-image) pixels, or per-patch normalised pixels."""
    target = patchify(imgs, p)
    if norm_pix:
        mean, var = patch_stats(target)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    return target


def denormalize_patches(pred: Tensor, imgs: Tensor, p: int) -> Tensor:
    """Map norm-pix predictions (B, N, P) back to pixel space with each patch's own statistics.

    A norm-pix model predicts only the shape of every patch; for pictures its output is shown with
    the mean and variance of the true patch (MAE issue #12).
    """
    mean, var = patch_stats(patchify(imgs, p))
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


def token_target(imgs: Tensor, tokenizer: nn.Module, grid: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float]) -> Tensor:
    """Codes (B, N) of a frozen tokenizer for normalised images (B, C, H, W), one per patch, row-major.

    The images are un-normalised with `mean` / `std` back to [0, 1] and resized (bicubic, antialiased)
    to `grid * tokenizer.downsample` pixels (grid: h x w patches): 112 px for DALL-E on 14 x 14 patches, as
    BEiT and CAE feed their tokenizer a second, half-size view of the same crop. No gradient, float32 even
    under autocast.
    """
    m = torch.tensor(mean, device=imgs.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device, dtype=torch.float32).view(1, -1, 1, 1)
    size = (grid[0] * tokenizer.downsample, grid[1] * tokenizer.downsample)
    no_autocast = torch.autocast(imgs.device.type, enabled=False) if imgs.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()
    with torch.no_grad(), no_autocast:
        pixels = (imgs.float() * s + m).clamp(0, 1)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
        codes = tokenizer(pixels)
    if codes.shape != (imgs.shape[0], grid[0] * grid[1]):
        expected = (imgs.shape[0], grid[0] * grid[1])
        raise ValueError(f"tokenizer returned codes of shape {tuple(codes.shape)}, expected {expected}")
    return codes
