"""Which patches a masked image model hides.

Every masking function returns `(ids_keep, ids_restore, mask)`:
    ids_keep    (B, K) int64, indices of the visible patches, in the order the encoder sees them;
    ids_restore (B, N) int64, the permutation that puts [kept, masked] tokens back in grid order;
    mask        (B, N) bool, True = masked (hidden from the encoder), in grid order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: `int(N * (1 - ratio))`, exactly as MAE computes it."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def random_masking(batch: int, num_patches: int, mask_ratio: float, *, noise: Tensor | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform random masking by noise + argsort (MAE `random_masking`).

    `noise` (B, N) in [0, 1) may be given explicitly (as transformers' ViTMAE allows) so that
    tests and references agree; otherwise it is drawn from `generator`.
    """
    keep = num_kept(num_patches, mask_ratio)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch, num_patches, generator=generator, device=gen_device).to(device)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask[:, :keep] = False
    mask = torch.gather(mask, 1, ids_restore)  # back to grid order
    return ids_keep, ids_restore, mask


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample: x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
