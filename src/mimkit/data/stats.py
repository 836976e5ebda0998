"""Per-channel mean and std of an image folder (`mimkit data stats`): what `data.mean` / `data.std` take.

Every pixel of every readable file counts (at full resolution, no crop), on the 0..1 scale of the
file's type (`mimkit.data.arrays`); sums are kept in float64 so that large folders do not lose
precision. Unreadable files are skipped and counted.
"""

from __future__ import annotations

import torch

from mimkit.data.arrays import read_pixels
from mimkit.data.decode import BadImageError, DataError
from mimkit.data.folder import ImageFolder, spread


def channel_stats(folder: str, channels: int = 3, limit: int = 0) -> dict:
    """{"mean": [...], "std": [...], "images": n, "pixels": n, "skipped": [(path, reason)]} over the files
    of `folder` (an `ImageFolder`: class sub-folders or files), `limit` of them spread over it (0: all)."""
    if channels < 1 or limit < 0:
        raise DataError(f"channels must be >= 1 and limit >= 0, got channels={channels}, limit={limit}")
    files = ImageFolder(folder, load_size=0, channels=channels)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    pixels, images, skipped = 0, 0, []
    chosen = spread(len(files), limit)
    for i in chosen:
        try:
            x = read_pixels(files.path(i), channels).double().div_(255).flatten(1)  # (C, H * W)
        except BadImageError as e:
            skipped.append((e.path, e.reason))
            continue
        total += x.sum(1)
        squares += (x * x).sum(1)
        pixels += x.shape[1]
        images += 1
    if not images:
        raise DataError(f"{folder}: no readable image among the {len(chosen)} file(s) read"
                        + (f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""))
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    return {"mean": [round(v, 6) for v in mean.tolist()], "std": [round(max(v, 1e-6), 6) for v in std.tolist()],
            "images": images, "pixels": pixels, "skipped": skipped}
