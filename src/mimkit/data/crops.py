"""RandomResizedCrop as the MAE and CAE papers draw it, in the loader workers, one image at a time.

The official pipelines run torchvision's `RandomResizedCrop(size, scale, ratio, bicubic)` on the
decoded file: a box covering a fraction of the area uniform in `scale`, with a log-uniform aspect
ratio in `ratio` (10 tries, then a central crop with the ratio clamped into range), placed uniformly
anywhere in the image, resampled to size x size. `RandomResizedCrop` here draws the same boxes on the
original image and decodes only what the box needs:

- JPEG files are decoded at the smallest DCT scale (1/2, 1/4, 1/8, libjpeg's scaled IDCT, through
  PIL's `draft`) at which the box still has at least `size` pixels on both sides, so a 20% crop of a
  12-MP photo never decodes 12 million pixels;
- the box is then resampled once, straight to size x size (bicubic, antialiased, PIL's filter), and
  what leaves the worker is the final uint8 crop.

Every sample's box comes from its own generator, seeded by (run seed, epoch, sample index), so crops
do not depend on the number of loader workers or processes and a resumed run draws them again exactly.
Flip and normalisation stay batched on the device (`transforms.PretrainAugment(crop=False)`).
"""

from __future__ import annotations

import hashlib
import math
import os
import random

import torch
from PIL import Image

from mimkit.config import size_pair
from mimkit.data.arrays import center_box, is_array_file, read_pixels, resample
from mimkit.data.decode import chw, decode_image, open_image, to_rgb

DCT_SCALES = (8, 4, 2, 1)  # what libjpeg can decode at: 1/8, 1/4, 1/2 and full size


def epoch_key(seed: int, epoch: int) -> int:
    """The 64-bit key of an epoch's crops; sample i of the epoch draws from Random((key << 64) + i)."""
    digest = hashlib.sha256(f"crop,{seed},{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random, tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one crop of a height x width image: torchvision's
    `RandomResizedCrop.get_params`, step for step, with `rng` as the source of randomness."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    h, w = fallback_size(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(h, w) of torchvision's fallback crop, centred when no draw fits: the whole image, cut to the
    nearest allowed aspect ratio."""
    if width / height < min(ratio):
        return round(width / min(ratio)), width
    if width / height > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def dct_scale(h: int, w: int, size: int | tuple[int, int]) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that leaves a box of h x w pixels at least `size`
    ((height, width), or one side) pixels large."""
    H, W = size_pair(size)
    return next(s for s in DCT_SCALES if h >= s * H and w >= s * W or s == 1)


class RandomResizedCrop:
    """Per-sample RandomResizedCrop (see the module docstring): `crop(src, key, index)` decodes the image
    file `src` (path or bytes) to (C, height, width) (`size`, or one side), the box drawn from
    Random((key << 64) + index). RGB files decode to uint8 through PIL; other channel counts and
    arrays through `arrays.read_pixels` (uint8, or float32 for data that is not 8-bit)."""

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), channels: int = 3):
        self.size = size_pair(size)
        self.scale, self.ratio, self.channels = tuple(scale), tuple(ratio), channels

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, channels={self.channels})"

    def box(self, height: int, width: int, key: int, index: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of sample `index`'s crop of a height x width image, for the epoch `key`."""
        return draw_box(height, width, self.scale, self.ratio, random.Random((key << 64) + index))

    def __call__(self, src: str | os.PathLike | bytes, key: int, index: int) -> torch.Tensor:
        if self.channels != 3 or is_array_file(src):
            pixels = read_pixels(src, self.channels)
            return resample(pixels, self.size, self.box(*pixels.shape[-2:], key, index))
        with open_image(src) as im:
            top, left, h, w = self.box(im.height, im.width, key, index)
            reduce = _draft(im, h, w, self.size)
            rgb = to_rgb(im)
        if reduce > 1:  # the box falls between decoded pixels: PIL resamples a fractional box exactly
            box = (left / reduce, top / reduce, (left + w) / reduce, (top + h) / reduce)
            return chw(rgb.resize(self.size[::-1], Image.Resampling.BICUBIC, box=box)).contiguous()
        # A whole-pixel box: torch's uint8 antialiased bicubic is PIL's filter (a = -0.5), rounded and
        # saturated like PIL's, and about 5x faster than PIL's resize.
        return resample(chw(rgb), self.size, (top, left, h, w))


def _draft(im: Image.Image, h: int, w: int, size: tuple[int, int]) -> int:
    """Ask a JPEG to decode at the largest DCT reduction that keeps an h x w box at least `size` pixels
    large (`dct_scale`); returns the reduction it will decode at (1 for other formats)."""
    s = dct_scale(h, w, size)
    if im.format != "JPEG" or s == 1:
        return 1
    # draft picks the largest scale at which the image is at least this large: s. Decoded pixel k then
    # covers source pixels k*s .. (k+1)*s - 1; it returns the source's extent in those units.
    width = im.width
    drafted = im.draft(None, (im.width // s, im.height // s))
    return 1 if drafted is None else round(width / drafted[1][2])


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A map-style dataset's key as (index, epoch key or None): the sampler of a dataset with a crop
    yields (index, epoch key) pairs (`loader.ResumableSampler(keyed=True)`), everything else indices."""
    return key if isinstance(key, tuple) else (key, None)


def sample_image(src: str | os.PathLike | bytes, load_size: int | tuple[int, int],
                 crop: RandomResizedCrop | None = None, key: int | None = None, index: int = 0,
                 channels: int = 3) -> torch.Tensor:
    """What a dataset item holds, for every source: without an epoch `key` the image resized to cover
    `load_size` and center-cropped (evaluation, pictures); with one, sample `index`'s training crop.
    Files of `channels` != 3 and arrays are read by `arrays.read_pixels`."""
    if key is None:
        if channels == 3 and not is_array_file(src):
            return decode_image(src, load_size)
        pixels = read_pixels(src, channels)
        size = size_pair(load_size)
        return resample(pixels, size, center_box(*pixels.shape[-2:], size)) if size[0] else pixels
    if crop is None:
        raise ValueError(f"sample {index} asked for a training crop (epoch key {key}) of a dataset built without one")
    return crop(src, key, index)
