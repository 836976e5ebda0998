"""Block-wise masking (BEiT / CAE): exact counts, rectangles, aspect bounds, seeding, frequencies."""

import math
import random

import pytest
import torch

from mimkit.masking import block_mask, block_masking, make_mask, random_masking, scaled_min_block
from mimkit.models import build_model


def _official_block_mask(rng: random.Random, grid: int, num_masked: int, min_block: int, min_aspect: float = 0.3):
    """The official generator (CAE `furnace/masking_generator.py`, BEiT's with an exact-count loop),
    transcribed literally with Python's `random`."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = [[0] * grid for _ in range(grid)]

    def add_block(max_patches):
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_block, max_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                covered = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - covered <= max_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    count = 0
    while count != num_masked:
        count += add_block(num_masked - count)
    return mask


@pytest.mark.parametrize("grid, num_masked", [(14, 98), (8, 32), (8, 48), (7, 1), (4, 15)])
def test_exact_count_for_every_sample(grid, num_masked):
    mask = block_mask(64, grid, num_masked, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, grid * grid) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [num_masked] * 64


def test_block_masking_contract_matches_random_masking():
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = block_masking(4, 196, 0.5, generator=g)
    assert ids_keep.shape == (4, 98) and mask.sum(1).tolist() == [98] * 4  # CAE: 98 of 196
    for b in range(4):
        visible = (~mask[b]).nonzero().flatten()
        assert torch.equal(ids_keep[b], visible)  # visible patches in grid order
        order = torch.cat([visible, mask[b].nonzero().flatten()])
        assert torch.equal(order[ids_restore[b]], torch.arange(196))  # ids_restore undoes [visible, masked]
    assert block_masking(2, 64, 0.75, generator=g)[2].sum(1).tolist() == [48, 48]  # same count rule as MAE


def test_blocks_are_rectangles_inside_the_grid_within_aspect_bounds():
    grid, min_aspect = 14, 0.3
    mask, blocks = block_mask(128, grid, 98, min_aspect=min_aspect, generator=torch.Generator().manual_seed(1),
                              return_blocks=True)
    b, top, left, h, w = blocks.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= grid).all() and (left + w <= grid).all()
    assert (h < grid).all() and (w < grid).all()  # BEiT: both sides smaller than the grid
    aspect = h.double() / w.double()
    assert (aspect >= min_aspect - 1e-9).all() and (aspect <= 1 / min_aspect + 1e-9).all()
    assert aspect.min() < 0.5 and aspect.max() > 2  # the range is used, not just squares
    # the mask is exactly the union of its rectangles
    rows, cols = torch.arange(grid).view(1, -1, 1), torch.arange(grid).view(1, 1, -1)
    rects = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
             & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    union = torch.zeros(128, grid, grid, dtype=torch.bool).index_put_((b,), rects, accumulate=True)
    assert torch.equal(union.flatten(1), mask)
    # the first block of an image is about the minimum size or larger (rounding of the sides aside);
    # later ones may be smaller, as the last few patches of the count are placed
    order = torch.argsort(b, stable=True)  # rectangles are listed round by round
    b, area = b[order], (h * w)[order]
    first = torch.ones_like(b, dtype=torch.bool)
    first[1:] = b[1:] != b[:-1]
    assert first.sum() == 128 and (area[first] >= 0.75 * scaled_min_block(grid * grid)).all()


def test_same_seed_same_masks():
    def draw(seed):
        return block_mask(16, 14, 98, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    a = make_mask("block", 8, 64, 0.5, generator=torch.Generator().manual_seed(5))
    b = make_mask("block", 8, 64, 0.5, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masking_frequency_matches_the_official_generator_and_is_flat_in_the_centre():
    n, grid, num_masked, min_block = 3000, 8, 32, 5
    ours = block_mask(n, grid, num_masked, min_block=min_block, generator=torch.Generator().manual_seed(0))
    freq = ours.view(n, grid, grid).double().mean(0)
    rng = random.Random(0)
    ref = torch.tensor([_official_block_mask(rng, grid, num_masked, min_block) for _ in range(n)]).double().mean(0)
    assert (freq - ref).abs().max() < 0.06  # same distribution as the official code, cell by cell
    assert freq.mean().item() == pytest.approx(0.5)
    # symmetric under the grid's flips and transposition: no bias to a side or an orientation
    for view in (freq.flip(0), freq.flip(1), freq.T):
        assert (freq - view).abs().max() < 0.06
    # BEiT's generator places blocks uniformly inside the grid, so edges are masked less often (by
    # construction, in the official code too); away from the edges the frequency is flat.
    centre = freq[2:-2, 2:-2]
    assert (centre - centre.mean()).abs().max() < 0.1 * centre.mean()
    assert freq.min() > 0.05  # every position gets masked


def test_min_block_scales_with_the_grid():
    assert scaled_min_block(196) == 16 and scaled_min_block(64) == 5 and scaled_min_block(4) == 1


def test_make_mask_dispatch():
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    a, b = make_mask("random", 2, 64, 0.75, noise=noise), random_masking(2, 64, 0.75, noise=noise)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="noise fixes random masks only"):
        make_mask("block", 2, 64, 0.5, noise=noise)
    with pytest.raises(ValueError, match="mask_type must be one of random, block"):
        make_mask("grid", 2, 64, 0.5)
    with pytest.raises(ValueError, match="square grid"):
        block_masking(2, 60, 0.5)


def test_mae_accepts_block_masks_from_its_config():
    torch.manual_seed(0)
    model = build_model("mae", preset="mae_vit_tiny_cifar_patch4", depth=1, decoder_depth=1, mask_type="block")
    out = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert out.mask.sum(1).tolist() == [48, 48] and torch.isfinite(out.loss)
    from mimkit.config import ConfigError

    with pytest.raises(ConfigError, match="model.mask_type: 'grid' is not one of random, block"):
        build_model("mae", mask_type="grid")
