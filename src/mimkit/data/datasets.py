"""The dataset a data section describes: image folders (`mimkit.data.folder`), CIFAR-10
(`mimkit.data.cifar`) or WebDataset shards (`mimkit.data.shards`), all yielding `Sample`s."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mimkit.config import ConfigError, size_pair
from mimkit.data.cifar import CIFAR10, load_cifar10
from mimkit.data.crops import RandomResizedCrop
from mimkit.data.decode import DataError
from mimkit.data.folder import ImageFolder
from mimkit.data.hf import HFImageDataset, HFStream
from mimkit.data.shards import MAX_MEMBER_BYTES, ShardDataset

if TYPE_CHECKING:
    from mimkit.config import DataConfig


def dataset_of(d: DataConfig, img_size: int | tuple[int, int], split: str | None = None, limit: int | None = None,
               strict: bool | None = None, train_crops: bool = False, channels: int = 3):
    """`build_dataset` for the data section `d`, for a model of `img_size` and `channels`; `split`, `limit`
    and `strict` replace d's. With `train_crops`, files (folders, shards) are cropped in the loader workers
    as the papers do (`crops.RandomResizedCrop` with d.scale and d.ratio); CIFAR stays whole."""
    if len(d.mean) != channels:
        raise ConfigError(f"data.mean and data.std have {len(d.mean)} values, one per channel, but model.in_chans is "
                          f"{channels}; set them (mimkit data stats FOLDER prints them for a folder)")
    crop = (RandomResizedCrop(img_size, d.scale, d.ratio, channels) if train_crops and d.dataset != "cifar10"
            else None)
    return build_dataset(d.dataset, d.root, split or d.split, img_size, load_size=d.load_size,
                         strict=d.strict if strict is None else strict, cache_dir=d.cache_dir,
                         limit=d.limit if limit is None else limit, shuffle_buffer=d.shuffle_buffer,
                         max_member_bytes=d.max_member_bytes, crop=crop, columns=(d.image_column, d.label_column),
                         channels=channels, streaming=d.streaming)


def load_pair(load_size: int | tuple[int, int], img_size: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) that evaluation images are decoded to: `load_size` as [h, w]; one int: the shorter side, in
    the model's aspect ratio; 0: img_size * 256 / 224 (MAE's resize-then-crop ratio)."""
    H, W = size_pair(img_size)
    if not isinstance(load_size, int):
        return size_pair(load_size)
    if not load_size:
        return round(H * 256 / 224), round(W * 256 / 224)
    return round(H * load_size / min(H, W)), round(W * load_size / min(H, W))


def build_dataset(
    dataset: str, root: str, split: str, img_size: int | tuple[int, int], *, load_size: int | tuple[int, int] = 0,
    strict: bool = False, cache_dir: str | None = "~/.cache/mimkit", limit: int = 0, shuffle_buffer: int = 1000,
    max_member_bytes: int = MAX_MEMBER_BYTES, crop: RandomResizedCrop | None = None,
    columns: tuple[str, str] = ("image", "label"), channels: int = 3, streaming: bool = False,
) -> ImageFolder | CIFAR10 | ShardDataset | HFImageDataset | HFStream:
    """The dataset a DataConfig describes.

    "cifar10": see load_cifar10 (images stay 32x32; the augmentation resizes to img_size).
    "folder": ImageFolder over root/split if that folder exists, else root, decoding to
    `load_pair(load_size, img_size)`; images and .npy arrays of any `channels` (the others: RGB only).
    "shards": a ShardDataset stream (mimkit.data.shards) over root/split if that folder exists, else
    root (a shard folder or a brace/glob pattern), decoding like "folder".
    "hf": a Hugging Face `datasets` dataset (`mimkit.data.hf`), image and label `columns`, decoding like "folder";
    with `streaming`, an `HFStream` (read in order, shuffled in `shuffle_buffer` rows, like shards).
    With a `crop`, folders, shards and hf datasets also give each sample's training crop (see ImageFolder).
    """
    if dataset not in ("cifar10", "folder", "shards", "hf"):
        raise DataError(f"unknown dataset {dataset!r}; expected 'cifar10', 'folder', 'shards' or 'hf'")
    if channels != 3 and dataset != "folder":
        raise ConfigError(f"data.dataset: {dataset} holds RGB images; model.in_chans={channels} needs "
                          "data.dataset=folder (images or .npy arrays of that many channels)")
    if dataset == "cifar10":
        return load_cifar10(root, split, cache_dir=cache_dir, strict=strict, limit=limit)
    load = load_pair(load_size, img_size)
    if dataset == "hf" and streaming:
        return HFStream(root, split, load, *columns, shuffle_buffer=shuffle_buffer, limit=limit, cache_dir=cache_dir,
                        crop=crop)
    if dataset == "hf":
        return HFImageDataset(root, split, load, *columns, limit=limit, cache_dir=cache_dir, crop=crop)
    sub = os.path.join(os.path.expanduser(root), split)
    root = sub if os.path.isdir(sub) else root
    if dataset == "folder":
        return ImageFolder(root, load, limit, crop=crop, channels=channels)
    return ShardDataset(root, load, shuffle_buffer, limit, max_member_bytes, crop=crop)
