"""Which patches a masked image model hides.

Every masking function returns `(ids_keep, ids_restore, mask)`:
    ids_keep    (B, K) int64, indices of the visible patches, in the order the encoder sees them;
    ids_restore (B, N) int64, the permutation that puts [kept, masked] tokens back in grid order;
    mask        (B, N) bool, True = masked (hidden from the encoder), in grid order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mimkit.config import size_pair
from mimkit.device import to_device


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
        noise = to_device(torch.rand(batch, num_patches, generator=generator, device=gen_device), device)
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


# --------------------------------------------------------------------------- block-wise masking

MASK_TYPES = ("random", "block")
BEIT_MIN_BLOCK, BEIT_GRID_AREA = 16, 196  # BEiT / CAE: blocks of at least 16 patches on a 14 x 14 grid
MAX_ROUNDS = 1000  # attempts per image before the last few patches are filled at random (never seen in tests)


def scaled_min_block(num_patches: int) -> int:
    """BEiT's minimum block of 16 patches, scaled by grid area: 16 on 14 x 14, 5 on 8 x 8.

    The minimum is a fraction of the image (16 / 196 ~ 8%), so a smaller grid needs a smaller one;
    an unscaled 16 would be a quarter of an 8 x 8 grid and leave 32-patch targets with two blocks.
    """
    return max(1, round(BEIT_MIN_BLOCK * num_patches / BEIT_GRID_AREA))


def patch_grid(patches: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a grid given as (h, w), or as a number of patches that make a square."""
    if not isinstance(patches, int):
        return tuple(patches)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches are not a square grid; give the grid as (h, w)")
    return side, side


def block_mask(batch: int, grid: int | tuple[int, int], num_masked: int, *, min_block: int | None = None,
               max_block: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               return_blocks: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """BEiT's block-wise mask generator (`MaskingGenerator`), batched, with exactly `num_masked` per image.

    Rectangles are added until the count is reached: area ~ U(min_block, min(remaining, max_block)),
    log-aspect (h / w) ~ U(log min_aspect, log max_aspect), sides rounded, both sides smaller than the
    grid, position uniform; a rectangle is accepted when it adds between 1 and `remaining` new patches
    (it may overlap earlier ones). As in CAE's copy of the generator, drawing continues until the count
    is exact, so batches stay rectangular. One deviation: a rectangle whose rounded sides leave the
    aspect range is redrawn, so the bounds hold exactly. All images draw in parallel, one attempt per
    round, from `generator`; images still short after `MAX_ROUNDS` rounds get their last patches at
    random (1 x 1 blocks).

    `grid` is the patch grid, (h, w) or one side of a square. Returns the mask (B, N) bool, True =
    masked, in grid (row-major) order; with `return_blocks`, also the accepted rectangles as rows
    (image, top, left, h, w) of an int64 tensor.
    """
    H, W = size_pair(grid)
    if not 0 < num_masked < H * W:
        raise ValueError(f"num_masked must be in [1, {H * W - 1}], got {num_masked}")
    min_block = scaled_min_block(H * W) if min_block is None else min_block
    max_block = num_masked if max_block is None else max_block
    max_aspect = max_aspect or 1 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    gen_device = generator.device if generator is not None else torch.device(device)
    rows = torch.arange(H, device=gen_device).view(1, H, 1)
    cols = torch.arange(W, device=gen_device).view(1, 1, W)
    mask = torch.zeros(batch, H, W, dtype=torch.bool, device=gen_device)
    count = torch.zeros(batch, dtype=torch.long, device=gen_device)
    blocks = []
    for _ in range(MAX_ROUNDS):
        remaining = num_masked - count  # (B,)
        if not bool((remaining > 0).any()):
            break
        u = torch.rand(batch, 5, generator=generator, device=gen_device, dtype=torch.float64)
        cap = remaining.clamp(max=max_block).double()
        area = min_block + (cap - min_block) * u[:, 0]  # random.uniform(a, b) also allows b < a
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        ok = (h >= 1) & (w >= 1) & (h < H) & (w < W)
        ok &= (h >= min_aspect * w) & (h <= max_aspect * w)
        h, w = h.clamp(1, H - 1), w.clamp(1, W - 1)
        top = (u[:, 2] * (H - h + 1)).long()  # uniform in [0, H - h]
        left = (u[:, 3] * (W - w + 1)).long()
        rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))  # (B, H, W)
        new = (rect & ~mask).flatten(1).sum(1)
        ok &= (remaining > 0) & (new > 0) & (new <= remaining.clamp(max=max_block))
        mask |= rect & ok.view(-1, 1, 1)
        count += new * ok
        if return_blocks:
            blocks.append(torch.stack([torch.arange(batch, device=gen_device), top, left, h, w], 1)[ok])
    mask = mask.flatten(1)
    short = num_masked - count
    if bool((short > 0).any()):  # fill the last few patches at random
        noise = torch.rand(batch, H * W, generator=generator, device=gen_device).masked_fill(mask, 2.0)
        rank = noise.argsort(1).argsort(1)
        extra = rank < short.view(-1, 1)
        mask |= extra
        if return_blocks:
            b, n = extra.nonzero(as_tuple=True)
            one = torch.ones_like(b)
            blocks.append(torch.stack([b, n // W, n % W, one, one], 1))
    mask = to_device(mask, device)
    if return_blocks:
        return mask, to_device(torch.cat(blocks) if blocks else torch.zeros(0, 5, dtype=torch.long), device)
    return mask


def split_ids(mask: Tensor, num_masked: int) -> tuple[Tensor, Tensor]:
    """Indices of the visible (B, K) and masked (B, M) patches of a (B, N) bool mask with `num_masked`
    True per row, each in grid order (a stable sort puts the visible ones first), as the official CAE
    code gathers them with `x[~bool_masked_pos]` and `x[bool_masked_pos]`."""
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # (B, N): [visible, masked]
    keep = mask.shape[1] - num_masked
    return ids_shuffle[:, :keep], ids_shuffle[:, keep:]


def ids_from_mask(mask: Tensor, num_masked: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(ids_keep, ids_restore, mask)` for a (B, N) bool mask with `num_masked` True per row."""
    ids_keep, ids_masked = split_ids(mask, num_masked)
    ids_restore = torch.argsort(torch.cat([ids_keep, ids_masked], dim=1), dim=1)
    return ids_keep, ids_restore, mask


def block_masking(batch: int, patches: int | tuple[int, int], mask_ratio: float, *, min_block: int | None = None,
                  min_aspect: float = 0.3, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Block-wise masking with the same contract and count as `random_masking`: N - int(N * (1 - ratio))
    patches hidden per image (98 of 196 at ratio 0.5, CAE's setting); `patches` is the grid (h, w) or
    the number of patches of a square one."""
    h, w = patch_grid(patches)
    num_masked = h * w - num_kept(h * w, mask_ratio)
    mask = block_mask(batch, (h, w), num_masked, min_block=min_block, min_aspect=min_aspect,
                      generator=generator, device=device)
    return ids_from_mask(mask, num_masked)


def make_mask(mask_type: str, batch: int, patches: int | tuple[int, int], mask_ratio: float, *,
              noise: Tensor | None = None, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", min_block: int | None = None,
              min_aspect: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """The masking a config names: `random` (MAE; `noise` may fix it) or `block` (BEiT / CAE), for the
    patch grid (h, w) (or a number of patches: a square grid)."""
    if mask_type == "random":
        n = patches if isinstance(patches, int) else patches[0] * patches[1]
        return random_masking(batch, n, mask_ratio, noise=noise, generator=generator, device=device)
    if mask_type == "block":
        if noise is not None:
            raise ValueError("noise fixes random masks only; block masks are drawn from a generator")
        return block_masking(batch, patches, mask_ratio, min_block=min_block, min_aspect=min_aspect,
                             generator=generator, device=device)
    raise ValueError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")


# --------------------------------------------------------------------------- SimMIM's random blocks


def block_random_mask(batch: int, grid: int | tuple[int, int], scale: int, mask_ratio: float, *,
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """SimMIM's `MaskGenerator`: the h x w patches (`grid`; one int: square) fall into (h / scale) x
    (w / scale) square blocks of scale x scale patches; ceil(blocks * ratio) of them, a uniform random
    subset per image, are masked. Returns (B, h * w) bool in grid order, True = masked."""
    h, w = size_pair(grid)
    if h % scale or w % scale:
        raise ValueError(f"a grid of {h} x {w} patches is not made of blocks of {scale}")
    bh, bw = h // scale, w // scale
    count = math.ceil(bh * bw * mask_ratio)
    gen_device = generator.device if generator is not None else device
    order = torch.rand(batch, bh * bw, generator=generator, device=gen_device).argsort(dim=1)
    blocks = torch.zeros(batch, bh * bw, dtype=torch.bool, device=gen_device)
    blocks.scatter_(1, order[:, :count], True)
    blocks = blocks.view(batch, bh, 1, bw, 1).expand(batch, bh, scale, bw, scale)
    return to_device(blocks.reshape(batch, h * w), device)


# --------------------------------------------------------------------------- I-JEPA's multi-block masks

CONTEXT_TIMEOUT = 20  # I-JEPA: draws of a context block before one target stops constraining it


def jepa_block_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """I-JEPA's `_sample_block_size`: int(h * w * scale) patches, scale uniform in `scale`, at an aspect
    ratio (height / width) uniform in `aspect`; sides rounded and kept smaller than the grid (and >= 1)."""
    H, W = grid
    r = torch.rand(1, generator=generator).item()
    keep = int(H * W * (scale[0] + r * (scale[1] - scale[0])))
    r = torch.rand(1, generator=generator).item()
    ratio = aspect[0] + r * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(keep * ratio)), round(math.sqrt(keep / ratio))
    return max(1, min(h, H - 1)), max(1, min(w, W - 1))


def _jepa_block(grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    """One h x w block at a uniform position (top in [0, H - h), as I-JEPA draws it): (H, W) bool."""
    (H, W), (h, w) = grid, size
    top = int(torch.randint(0, H - h, (1,), generator=generator))
    left = int(torch.randint(0, W - w, (1,), generator=generator))
    block = torch.zeros(H, W, dtype=torch.bool)
    block[top : top + h, left : left + w] = True
    return block


def _jepa_context(grid, size, targets: list[Tensor], min_keep: int, generator) -> Tensor:
    """The context block minus the target blocks, more than `min_keep` patches: after CONTEXT_TIMEOUT
    draws that keep too few, the last target stops constraining it (I-JEPA's `constrain_mask` tries)."""
    tries, timeout = 0, CONTEXT_TIMEOUT
    while True:
        block = _jepa_block(grid, size, generator)
        for target in targets[: max(len(targets) - tries, 0)]:
            block &= ~target
        ids = block.flatten().nonzero()[:, 0]
        if len(ids) > min_keep:
            return ids
        if tries > len(targets):
            raise ValueError(f"a context block of {size[0]} x {size[1]} patches never keeps more than min_keep="
                             f"{min_keep} of a {grid[0]} x {grid[1]} grid; lower model.min_keep")
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, CONTEXT_TIMEOUT


def multiblock_masks(batch: int, grid: tuple[int, int], *, num_targets: int = 4,
                     target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                     context_scale: tuple[float, float] = (0.85, 1.0), min_keep: int = 10,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     ) -> tuple[Tensor, Tensor]:
    """I-JEPA's `MaskCollator` (masks/multiblock.py): one target block size and one context block size per
    batch (the context square, aspect 1); per image `num_targets` target blocks anywhere, then one
    context block with every target patch removed. Indices are in grid (row-major) order and cut to the
    shortest of the batch, as the official collator does. Everything is drawn from `generator`.

    Returns (context ids (B, Kc), target ids (num_targets, B, Kt))."""
    target_size = jepa_block_size(grid, target_scale, target_aspect, generator)
    context_size = jepa_block_size(grid, context_scale, (1.0, 1.0), generator)
    contexts, targets = [], []
    for _ in range(batch):
        blocks = [_jepa_block(grid, target_size, generator) for _ in range(num_targets)]
        targets.append([b.flatten().nonzero()[:, 0] for b in blocks])
        contexts.append(_jepa_context(grid, context_size, blocks, min_keep, generator))
    kt = min(len(t) for image in targets for t in image)
    kc = min(len(c) for c in contexts)
    target_ids = torch.stack([torch.stack([image[j][:kt] for image in targets]) for j in range(num_targets)])
    return to_device(torch.stack([c[:kc] for c in contexts]), device), to_device(target_ids, device)


# --------------------------------------------------------------------------- data2vec 2.0's inverse block masks


def inverse_block_mask(batch: int, grid: tuple[int, int], mask_ratio: float = 0.8, block: int = 3,
                       adjust: float = 0.07, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """data2vec 2.0's `compute_block_mask_2d` with `inverse_mask`: the *visible* patches come in blocks.
    int(N (1 - ratio + adjust) / block^2) centres per image, uniform (repeats allowed), each grown to a
    block x block square clamped to the grid; then patches are added or dropped uniformly at random until
    exactly int(N (1 - ratio)) are visible (`require_same_masks`). Returns (B, N) bool, True = masked."""
    H, W = grid
    N, keep = H * W, 1 - mask_ratio
    gen_device = generator.device if generator is not None else torch.device("cpu")
    centres = torch.randint(0, N, (batch, int(N * (keep + adjust) / block**2)), generator=generator, device=gen_device)
    offsets = torch.arange(block, device=gen_device) - block // 2
    rows = (centres // W)[..., None, None] + offsets.view(1, 1, -1, 1)  # (B, C, block, 1)
    cols = (centres % W)[..., None, None] + offsets.view(1, 1, 1, -1)  # (B, C, 1, block)
    rows, cols = rows.clamp(0, H - 1).expand(-1, -1, block, block), cols.clamp(0, W - 1).expand(-1, -1, block, block)
    visible = torch.zeros(batch, H, W, dtype=torch.bool, device=gen_device)
    images = torch.arange(batch, device=gen_device).view(-1, 1, 1, 1).expand_as(rows)
    visible[images, rows, cols] = True
    visible = visible.flatten(1)
    # exactly int(N * keep) visible: the blocks' patches first (a random subset of them when there are
    # too many), then random others: the same uniform choices as the official multinomial draws
    score = visible.float() * 2 + torch.rand(batch, N, generator=generator, device=gen_device)
    chosen = score.topk(int(N * keep), dim=1).indices
    return to_device(torch.ones(batch, N, dtype=torch.bool, device=gen_device).scatter_(1, chosen, False), device)
