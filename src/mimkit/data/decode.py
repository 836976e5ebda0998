"""Decoding one image file (path or bytes) to RGB uint8, and the vocabulary of unreadable data.

Every dataset item is a `Sample(image, label, path, reason)`: `image` is (C, H, W) with the same size
for the whole dataset (uint8; float32 for data that is not 8-bit, see `mimkit.data.arrays`), or None
when the file is unreadable, `reason` saying why. Unreadable files
never raise inside a worker; `loader.collate` drops and lists them, and the training loop decides
(count and report, or raise `BadImageError` in strict mode).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mimkit.config import size_pair

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
# Larger images are refused before their pixels are decoded (a decompression bomb is a few KB of PNG
# that decodes to gigabytes): 2^28 pixels is 16384 x 16384, 768 MiB as RGB.
MAX_IMAGE_PIXELS = 1 << 28


class DataError(ValueError):
    """Data that cannot be used as a whole (an empty folder, a malformed shard index, a source that
    yields no readable image); the message is one line and names the path."""


class BadImageError(ValueError):
    """An image file that cannot be decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # args stay (path, reason) so the error pickles
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"unreadable image {self.path}: {self.reason}"


class Sample(NamedTuple):
    """One dataset item; `image` is (C, H, W) uint8 or float32, or None with `reason` when unreadable."""

    image: torch.Tensor | None
    label: int
    path: str
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(src: str | os.PathLike | bytes, size: int | tuple[int, int] = 0) -> torch.Tensor:
    """Decode an image file (path or bytes) of any mode to RGB uint8 (3, H, W).

    With a size (one side, or (h, w)), resize the image to cover it (bicubic, antialiased) and
    center-crop it to that size. Raises BadImageError for anything unreadable.
    """
    H, W = size_pair(size)

    def central_box(im: Image.Image) -> Image.Image:
        rgb = to_rgb(im)
        if not H or rgb.size == (W, H):
            return rgb
        # Resizing the central box of the output's aspect straight to W x H is Resize + CenterCrop
        # without resampling the pixels the crop throws away.
        w, h = rgb.size
        bw, bh = (h * W / H, h) if w * H >= h * W else (w, w * H / W)  # exact for a square output
        left, top = (w - bw) / 2, (h - bh) / 2
        return rgb.resize((W, H), Image.Resampling.BICUBIC, box=(left, top, left + bw, top + bh))

    return read_image(src, central_box)


def read_image(src: str | os.PathLike | bytes, make: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """`make(image)` as uint8 (3, H, W), for the image file `src` opened (see `open_image`); `make`
    returns an RGB image."""
    with open_image(src) as im:
        pixels = chw(make(im))  # decoding truncated data raises here
    return pixels.contiguous()


def chw(rgb: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as uint8 (3, H, W), a view of one (H, W, 3) copy."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


@contextmanager
def open_image(src: str | os.PathLike | bytes) -> Iterator[Image.Image]:
    """The image file `src` (path or bytes) opened, its pixels not yet decoded (so that a crop can ask
    for less, `Image.draft`), at most MAX_IMAGE_PIXELS. Anything unreadable, also while the body of
    the `with` decodes it, raises BadImageError; so does a path that is not a regular file (a FIFO
    would block the reader, a device never end), wherever the path came from."""
    src = src if isinstance(src, bytes) else os.fspath(src)
    name = src if isinstance(src, str) else "<bytes>"
    try:
        if isinstance(src, str) and not stat.S_ISREG(os.stat(src).st_mode):
            raise BadImageError(name, "not a regular file")
        if (len(src) if isinstance(src, bytes) else os.path.getsize(src)) == 0:
            raise BadImageError(name, "empty file")
        with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadImageError(name, f"{im.width} x {im.height} pixels, more than MAX_IMAGE_PIXELS "
                                          f"({MAX_IMAGE_PIXELS})")
            yield im
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not a recognised image format") from None
    except Exception as e:  # PIL's plugins raise many types on corrupt data (OSError, struct.error, ...)
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` in RGB, its pixels decoded (16-bit and float images mapped to 8 bits, alpha dropped)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # PIL's convert("RGB") clips these to 255 (a white image); map the 16-bit range to 8 bits.
        a = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
    if im.mode == "RGB":
        im.load()  # raises on truncated data, like convert() below would
        return im
    # Alpha is dropped, as torchvision's ImageFolder loader (used by MAE) does.
    return im.convert("RGB")
