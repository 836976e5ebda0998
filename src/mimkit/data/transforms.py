"""Batched image transforms on the training device.

Inputs are (B, C, H, W) batches from the loader, uint8 or float32 on the same 0..255 scale
(`mimkit.data.arrays`); outputs are normalised float32. All randomness comes from a `torch.Generator`
argument, so tests pin it and resumed runs replay it. Sizes are (height, width), or one side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize

from mimkit.config import IMAGENET_MEAN, IMAGENET_STD, size_pair
from mimkit.data.crops import fallback_size
from mimkit.device import to_device


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Pixels on the 0..255 scale (uint8 or float, (B, C, H, W)) -> float32 (x / 255 - mean) / std, one
    mean and std per channel."""
    return _normalize_(_float_copy(images), mean, std)


def _float_copy(images: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of `images` that this call owns (float() of a float32 tensor is the tensor itself)."""
    return images.float() if images.dtype != torch.float32 else images.clone()


def _normalize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """`normalize` in place on the float32 `x`: the values of (x / 255 - mean) / std, without temporaries."""
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.div_(255).sub_(mean_t).div_(std_t)


def random_resized_crop_params(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator, tries: int = 10,
) -> tuple[torch.Tensor, ...]:
    """Crop boxes (top, left, h, w), each float32 (n,) on the generator's device.

    torchvision's RandomResizedCrop.get_params, vectorised: up to `tries` draws of an area
    fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`; each sample keeps its
    first draw that fits the image, or else a central crop with the ratio clamped into range.
    """
    device = generator.device
    area = height * width
    fraction = scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator, device=device))
    w = torch.round(torch.sqrt(area * fraction * aspect))
    h = torch.round(torch.sqrt(area * fraction / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, tries)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]

    fh, fw = fallback_size(height, width, ratio)  # torchvision's, where no draw fits
    found = fits.any(1)
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))

    # Uniform integer offsets in [0, height - h] and [0, width - w] (randint's range).
    u = torch.rand(n, 2, generator=generator, device=device)
    top = torch.minimum(torch.floor(u[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return top, left, h, w


def crop_boxes(
    top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, size: int | tuple[int, int]
) -> torch.Tensor:
    """Crops (each (B,)) -> kornia boxes (B, 4, 2) that resample like torchvision/PIL.

    kornia maps the box corners onto the centres of the corner output pixels (inclusive pixel
    coordinates, align-corners style). Resizing with half-pixel centres (align_corners=False)
    reads output pixel k from source x = left + (k + 0.5) * w / size - 0.5, so the corner
    pixels k = 0 and k = size - 1 sit half an output pixel inside the crop.
    """
    height, width = size_pair(size)
    x0 = left + 0.5 * w / width - 0.5
    x1 = left + w - 0.5 * w / width - 0.5
    y0 = top + 0.5 * h / height - 0.5
    y1 = top + h - 0.5 * h / height - 0.5
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]  # top-left, top-right, bottom-right, bottom-left
    return torch.stack([torch.stack(c, -1) for c in corners], 1)


class PretrainAugment:
    """MAE pretraining augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalise.

    (B, C, S, S) -> float32 (B, C, height, width) (`size`). With `crop=False` the images are crops already
    (drawn per sample in the loader workers, `data.crops`), and only the flip and normalisation run here.
    """

    def __init__(
        self, size: int | tuple[int, int], scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD, crop: bool = True,
    ):
        self.size, self.scale, self.ratio, self.hflip = size_pair(size), tuple(scale), tuple(ratio), hflip
        self.mean, self.std, self.crop = tuple(mean), tuple(std), crop

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, height, width = images.shape
        if not self.crop:
            if (height, width) != self.size:
                raise ValueError(f"PretrainAugment(crop=False) expects {self.size[0]} x {self.size[1]} crops, got "
                                 f"{height} x {width}")
            x = _float_copy(images)
        else:
            x = self._crop(images, generator)
        if self.hflip:
            # Which images flip is decided where the generator is; the device gets their indices (a boolean
            # mask there would cost a host sync to count them). Only the flipped half is copied.
            flip = to_device((torch.rand(b, generator=generator, device=generator.device) < 0.5).nonzero()[:, 0],
                             x.device)
            x[flip] = x[flip].flip(-1)
        return _normalize_(x, self.mean, self.std)  # x is this call's own tensor

    def _crop(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, height, width = images.shape
        # Random numbers are drawn on the generator's device (often the CPU) and then moved, so
        # the stream does not depend on where the images are.
        params = random_resized_crop_params(b, height, width, self.scale, self.ratio, generator)
        boxes = crop_boxes(*(to_device(p, images.device) for p in params), self.size)
        x = crop_and_resize(images.float(), boxes, self.size, mode="bicubic", padding_mode="border",
                            align_corners=False)
        # bicubic overshoots; PIL/torchvision would saturate 8-bit data here (data of more bits is not clipped)
        return x.clamp_(0, 255) if images.dtype == torch.uint8 else x


class EvalTransform:
    """Evaluation resize + center crop (MAE/timm): the image resized (bicubic, antialiased) to cover
    int(height / crop_pct) x int(width / crop_pct) of `size` (for a square: the shorter side to
    int(size / crop_pct)), center crop `size`, normalise. (B, C, H, W) -> float32 (B, C, height, width)."""

    def __init__(
        self, size: int | tuple[int, int], crop_pct: float = 224 / 256, mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        self.size, self.crop_pct, self.mean, self.std = size_pair(size), crop_pct, tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        (H, W), x = self.size, images.float()
        cover_h, cover_w = int(H / self.crop_pct), int(W / self.crop_pct)
        if cover_h * width >= cover_w * height:  # the height decides
            new = (cover_h, int(cover_h * width / height))
        else:
            new = (int(cover_w * height / width), cover_w)
        if new != (height, width):
            height, width = new
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
            if images.dtype == torch.uint8:
                x = x.clamp_(0, 255)
        top, left = round((height - H) / 2), round((width - W) / 2)
        return normalize(x[..., top : top + H, left : left + W], self.mean, self.std)
