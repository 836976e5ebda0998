"""Reconstruction pictures as in the MAE paper's figures: original | masked | reconstruction |
reconstruction with the visible patches pasted back, one row per image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mimkit.targets import denormalize_patches, patchify, unpatchify

MIN_CELL = 128  # small images (CIFAR's 32 px) are enlarged with nearest-neighbour to stay legible


@torch.no_grad()
def reconstruction_grid(model: nn.Module, imgs: Tensor, mean, std, seed: int = 0,
                        bands: tuple[int, ...] = ()) -> Tensor:
    """Picture grid (3, rows * H, 4 * W) in [0, 1] for normalised images (B, C, H, W).

    Masks come from a generator seeded with `seed`, so successive checkpoints are shown with the
    same masks. Norm-pix predictions are shown with each true patch's mean and variance. A model that
    predicts the masked patches only (CAE: `pred` is (B, M, P), in grid order) gets grey where it made
    no prediction; one that predicts codes or representations, not pixels (`cfg.target == "tokens"`,
    or no `pred`: I-JEPA), is shown with its masks only: original | masked. RGB images are shown as
    they are; other channel counts through `display` (grey for one channel, the `bands` triple of
    more), each row stretched to its original.
    """
    was_training = model.training
    model.eval()
    imgs = imgs.to(next(model.parameters()).device)
    out = model(imgs, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    p, grid = model.patch_size, model.patch_embed.grid_size
    mask = out.mask.unsqueeze(-1)  # (B, N, 1)
    patches = patchify(imgs, p)
    hidden = unpatchify(mask.expand_as(patches).float(), p, grid)[:, :1] > 0  # (B, 1, H, W)
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    data = imgs * s + m
    view = display(data, bands)
    orig = view(data)
    cells = [orig, torch.where(hidden, 0.5, orig)]  # grey = hidden from the encoder
    if out.pred is not None and getattr(model.cfg, "target", "pixels") != "tokens":
        pred, predicted = full_prediction(out.pred.float(), out.mask, patches)
        if getattr(model.cfg, "norm_pix_loss", False):
            pred = denormalize_patches(pred, imgs, p)
        recon = view(unpatchify(pred, p, grid) * s + m)
        pasted = view(unpatchify(torch.where(mask, pred, patches), p, grid) * s + m)
        shown = unpatchify(predicted.unsqueeze(-1).expand_as(patches).float(), p, grid)[:, :1] > 0
        cells += [torch.where(shown, recon, 0.5), pasted]
    height, width = imgs.shape[-2:]
    if min(height, width) < MIN_CELL:
        scale = -(-MIN_CELL // min(height, width))
        cells = [F.interpolate(c, scale_factor=scale, mode="nearest") for c in cells]
    rows = torch.cat(cells, dim=3)  # (B, 3, H, 4W)
    return torch.cat(list(rows), dim=1).cpu()  # (3, B*H, 4W)


def display(orig: Tensor, bands: tuple[int, ...] = ()) -> Callable[[Tensor], Tensor]:
    """How images on the data's 0..1 scale (B, C, H, W) are shown in RGB in [0, 1], given the originals:
    RGB as it is (clipped); one channel as grey; more, the three `bands` (default the first three) as
    R, G, B. Data that is not RGB is stretched per image and band to the range of its original:
    16-bit and multispectral data rarely spans 0..1."""
    C = orig.shape[1]
    if C == 3 and not bands:
        return lambda x: x.clamp(0, 1)
    picked = [0, 0, 0] if C == 1 and not bands else list(bands or (0, 1, 2))
    if len(picked) != 3 or not all(0 <= b < C for b in picked):
        raise ValueError(f"data.rgb_bands: three of the {C} channels, shown as R, G, B; got {picked}")
    lo, hi = orig[:, picked].amin(dim=(2, 3), keepdim=True), orig[:, picked].amax(dim=(2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    return lambda x: ((x[:, picked] - lo) / span).clamp(0, 1)


def full_prediction(pred: Tensor, mask: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions for every patch (B, N, P) and where they exist (B, N) bool.

    `pred` is either (B, N, P), one prediction per patch (MAE), or (B, M, P) for the masked patches
    only, in grid order (CAE); the missing ones are zeros.
    """
    B, N, P = patches.shape
    if pred.shape[1] == N:
        return pred, torch.ones(B, N, dtype=torch.bool, device=pred.device)
    full = pred.new_zeros(B, N, P)
    full[mask] = pred.reshape(-1, P)
    return full, mask


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG (atomically, like checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path


def save_reconstruction(model: nn.Module, imgs: Tensor, path: str | Path, mean, std, seed: int = 0,
                        bands: tuple[int, ...] = ()) -> Path:
    return save_png(reconstruction_grid(model, imgs, mean, std, seed, bands), path)


def plot_run(run_dir: str | Path) -> Path:
    """Curves of a run's metrics.jsonl -> run_dir/curves.png: loss, lr and every accuracy (`*top1`),
    each against optimizer steps and against wall time (when logged)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import
    import matplotlib.pyplot as plt

    from mimkit.metrics import read_metrics

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics to plot")
    records = read_metrics(path)
    keys = ["loss", "lr"] + sorted({k for r in records for k in r if k.endswith("top1")})
    keys = [k for k in keys if any(k in r for r in records)]
    xs = [("step", "optimizer step")] + ([("time_s", "wall time (s)")] if any("time_s" in r for r in records) else [])
    fig, axes = plt.subplots(len(keys), len(xs), figsize=(5 * len(xs), 2.6 * len(keys)), squeeze=False)
    times = {r["step"]: r["time_s"] for r in records if "time_s" in r}
    for row, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        for col, (x, label) in enumerate(xs):
            ax = axes[row][col]
            px = [s if x == "step" else times.get(s) for s, _ in points]
            pts = [(a, b) for a, b in zip(px, (v for _, v in points)) if a is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o" if len(pts) < 30 else None, ms=3)
            ax.set_xlabel(label)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
