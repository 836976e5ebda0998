"""Reconstruction pictures as in the MAE paper's figures: original | masked | reconstruction |
reconstruction with the visible patches pasted back, one row per image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mimkit.targets import denormalize_patches, patchify, unpatchify

MIN_CELL = 128  # small images (CIFAR's 32 px) are enlarged with nearest-neighbour to stay legible


@torch.no_grad()
def reconstruction_grid(model: nn.Module, imgs: Tensor, mean, std, seed: int = 0) -> Tensor:
    """Picture grid (3, rows * S, 4 * S) in [0, 1] for normalised images (B, 3, H, W).

    Masks come from a generator seeded with `seed`, so successive checkpoints are shown with the
    same masks. Norm-pix predictions are shown with each true patch's mean and variance.
    """
    was_training = model.training
    model.eval()
    imgs = imgs.to(next(model.parameters()).device)
    out = model(imgs, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    p = model.patch_size
    pred = out.pred.float()
    if getattr(model.cfg, "norm_pix_loss", False):
        pred = denormalize_patches(pred, imgs, p)
    mask = out.mask.unsqueeze(-1)  # (B, N, 1)
    patches = patchify(imgs, p)
    recon = unpatchify(pred, p)
    pasted = unpatchify(torch.where(mask, pred, patches), p)
    hidden = unpatchify(mask.expand_as(patches).float(), p) > 0  # (B, 3, H, W)
    m = torch.tensor(mean, device=imgs.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, 3, 1, 1)
    orig, recon, pasted = ((x * s + m).clamp(0, 1) for x in (imgs, recon, pasted))
    cells = [orig, torch.where(hidden, 0.5, orig), recon, pasted]  # grey = hidden from the encoder
    size = imgs.shape[-1]
    if size < MIN_CELL:
        scale = -(-MIN_CELL // size)
        cells = [F.interpolate(c, scale_factor=scale, mode="nearest") for c in cells]
    rows = torch.cat(cells, dim=3)  # (B, 3, S, 4S)
    return torch.cat(list(rows), dim=1).cpu()  # (3, B*S, 4S)


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG (atomically, like checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path


def save_reconstruction(model: nn.Module, imgs: Tensor, path: str | Path, mean, std, seed: int = 0) -> Path:
    return save_png(reconstruction_grid(model, imgs, mean, std, seed), path)
