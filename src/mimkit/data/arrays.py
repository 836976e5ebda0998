"""Images of any channel count and bit depth: grey and 16-bit PNG / TIFF, multi-band TIFF and `.npy` arrays.

`read_pixels(src, channels)` gives every pixel of a file as (C, H, W): uint8 for 8-bit data, float32
otherwise, on the same 0..255 scale, so that one normalisation `(x / 255 - mean) / std` serves all
(`data.mean` / `data.std` are on the 0..1 scale of the file's type, what `mimkit data stats` prints):

- an unsigned or signed integer type's maximum maps to 255 (16-bit: x * 255 / 65535), nothing is
  clipped or rounded to 8 bits; PIL's 32-bit integer mode `I` (how some 16-bit files open) is read
  on the 16-bit scale;
- floating-point data is taken as 0..1 (x * 255), any range kept, non-finite values refused.

`.npy` files are read without pickle (nothing in a file runs code) through a memory map whose header
is checked before any pixel is copied; `.tif` files go through `tifffile` when it is installed
(`pip install 'mimkit[tiff]'`: multi-page and multi-band), else PIL. A 3-D array is channels-last
(H, W, C) when its last axis has `channels` entries, else channels-first (C, H, W).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.data.decode import MAX_IMAGE_PIXELS, BadImageError, open_image, to_rgb

ARRAY_EXTENSIONS = (".npy",)
SIXTEEN_BIT = 65535


def is_array_file(src) -> bool:
    """Whether `src` is a path to an `.npy` array (read by `read_pixels` whatever the channel count)."""
    return isinstance(src, (str, os.PathLike)) and os.fspath(src).lower().endswith(ARRAY_EXTENSIONS)


def read_pixels(src: str | os.PathLike | bytes, channels: int) -> torch.Tensor:
    """Every pixel of the image file `src` with `channels` channels: (C, H, W), uint8 or float32 on the
    0..255 scale (see the module docstring). Raises BadImageError for anything unreadable or with
    another channel count."""
    name = os.fspath(src) if not isinstance(src, bytes) else "<bytes>"
    try:
        if is_array_file(src):
            array = _read_npy(name)
        elif isinstance(src, (str, os.PathLike)) and name.lower().endswith((".tif", ".tiff")) and \
                (tifffile := _tifffile()) is not None:
            array = _read_tiff(name, tifffile)
        else:
            with open_image(src) as im:
                array = _pil_array(im, channels, name)
        return _to_chw(array, channels, name)
    except BadImageError:
        raise
    except Exception as e:  # numpy and tifffile raise many types on damaged files
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e


def _tifffile():
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def _check_size(shape: tuple, name: str) -> None:
    """An image's shape, before its data is read: 2 or 3 axes, at most MAX_IMAGE_PIXELS pixels (the two
    longest axes) and 4 * MAX_IMAGE_PIXELS values."""
    if len(shape) not in (2, 3):
        raise BadImageError(name, f"an array of shape {shape}; expected (H, W), (H, W, C) or (C, H, W)")
    h, w = sorted(shape)[-2:]
    if h * w > MAX_IMAGE_PIXELS or math.prod(shape) > 4 * MAX_IMAGE_PIXELS:
        raise BadImageError(name, f"shape {shape}: more than MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS}) pixels or "
                                  f"{4 * MAX_IMAGE_PIXELS} values")


def _read_npy(path: str) -> np.ndarray:
    """An .npy array: the header (shape, type) checked through a memory map, then copied; never unpickled."""
    if os.path.getsize(path) == 0:
        raise BadImageError(path, "empty file")
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    _check_size(mapped.shape, path)
    return np.array(mapped)


def _read_tiff(path: str, tifffile) -> np.ndarray:
    """A TIFF's first series (all pages and bands) through the `tifffile` module, its shape checked
    before reading."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = tuple(s for s in series.shape if s != 1) or (1, 1)  # squeeze sample / page axes of length 1
        _check_size(shape, path)
        return series.asarray().reshape(shape)


def _pil_array(im: Image.Image, channels: int, name: str) -> np.ndarray:
    """The pixels of a PIL image for `channels` channels: grey for 1 (16-bit and float kept), RGB for 3,
    else the image's own bands when there are that many."""
    if channels == 3:
        return np.asarray(to_rgb(im))
    if channels == 1:
        if im.mode.startswith("I;16") or im.mode in ("I", "F", "L"):
            a = np.asarray(im)
            return np.clip(a, 0, SIXTEEN_BIT).astype(np.uint16) if im.mode == "I" else a  # the 16-bit scale
        return np.asarray(im.convert("L"))
    if len(im.getbands()) == channels and im.mode in ("RGBA", "CMYK", "LA"):
        return np.asarray(im)
    raise BadImageError(name, f"a {im.mode} image has {len(im.getbands())} band(s), not {channels}; N-channel data "
                              "comes as .npy or multi-band .tif files (pip install 'mimkit[tiff]')")


def _to_chw(a: np.ndarray, channels: int, name: str) -> torch.Tensor:
    """(C, H, W) uint8 or float32 on the 0..255 scale, from (H, W), (H, W, C) or (C, H, W)."""
    _check_size(a.shape, name)
    if a.ndim == 2:
        a = a[None]
    elif a.shape[-1] == channels:
        a = np.moveaxis(a, -1, 0)
    if a.shape[0] != channels:
        raise BadImageError(name, f"shape {a.shape}: no axis of {channels} channels (model.in_chans)")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))  # PIL's arrays are read-only
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
        return torch.from_numpy(a.astype(np.float32) * np.float32(255.0 / np.iinfo(a.dtype).max))
    if np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32) * np.float32(255.0)
        if not np.isfinite(out).all():
            raise BadImageError(name, "non-finite values (NaN or inf)")
        return torch.from_numpy(out)
    raise BadImageError(name, f"pixels of type {a.dtype}; expected integers or floating point")


def resample(pixels: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The (top, left, h, w) `box` of (C, H, W) pixels (default: all) resized to `size` (h, w): bicubic,
    antialiased, PIL's filter; uint8 stays uint8 (rounded and saturated), float is not clipped."""
    top, left, h, w = box or (0, 0, *pixels.shape[-2:])
    x = pixels[None, :, top : top + h, left : left + w]
    if (h, w) == tuple(size):
        return x[0].contiguous()
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)[0].contiguous()


def center_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w): the largest central box of a height x width image with the aspect of `size`,
    in whole pixels (Resize + CenterCrop without resampling what the crop throws away)."""
    scale = min(height / size[0], width / size[1])
    h, w = min(height, max(1, round(size[0] * scale))), min(width, max(1, round(size[1] * scale)))
    return (height - h) // 2, (width - w) // 2, h, w
