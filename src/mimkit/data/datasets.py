"""The dataset a data section describes: image folders (`mimkit.data.folder`), CIFAR-10
(`mimkit.data.cifar`) or WebDataset shards (`mimkit.data.shards`), all yielding `Sample`s."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mimkit.data.cifar import CIFAR10, load_cifar10
from mimkit.data.crops import RandomResizedCrop
from mimkit.data.decode import DataError
from mimkit.data.folder import ImageFolder
from mimkit.data.hf import HFImageDataset
from mimkit.data.shards import MAX_MEMBER_BYTES, ShardDataset

if TYPE_CHECKING:
    from mimkit.config import DataConfig


def dataset_of(d: DataConfig, img_size: int, split: str | None = None, limit: int | None = None,
               strict: bool | None = None, train_crops: bool = False):
    """`build_dataset` for the data section `d`, for a model of `img_size`; `split`, `limit` and
    `strict` replace d's. With `train_crops`, files (folders, shards) are cropped in the loader workers
    as the papers do (`crops.RandomResizedCrop` with d.scale and d.ratio); CIFAR stays whole."""
    crop = RandomResizedCrop(img_size, d.scale, d.ratio) if train_crops and d.dataset != "cifar10" else None
    return build_dataset(d.dataset, d.root, split or d.split, img_size, load_size=d.load_size,
                         strict=d.strict if strict is None else strict, cache_dir=d.cache_dir,
                         limit=d.limit if limit is None else limit, shuffle_buffer=d.shuffle_buffer,
                         max_member_bytes=d.max_member_bytes, crop=crop, columns=(d.image_column, d.label_column))


def build_dataset(
    dataset: str, root: str, split: str, img_size: int, *, load_size: int = 0, strict: bool = False,
    cache_dir: str | None = "~/.cache/mimkit", limit: int = 0, shuffle_buffer: int = 1000,
    max_member_bytes: int = MAX_MEMBER_BYTES, crop: RandomResizedCrop | None = None,
    columns: tuple[str, str] = ("image", "label"),
) -> ImageFolder | CIFAR10 | ShardDataset | HFImageDataset:
    """The dataset a DataConfig describes.

    "cifar10": see load_cifar10 (images stay 32x32; the augmentation resizes to img_size).
    "folder": ImageFolder over root/split if that folder exists, else root, decoding to
    load_size (0: round(img_size * 256 / 224), MAE's resize-then-crop ratio).
    "shards": a ShardDataset stream (mimkit.data.shards) over root/split if that folder exists, else
    root (a shard folder or a brace/glob pattern), decoding like "folder".
    "hf": a Hugging Face `datasets` dataset (`mimkit.data.hf`), image and label `columns`, decoding like "folder".
    With a `crop`, folders, shards and hf datasets also give each sample's training crop (see ImageFolder).
    """
    if dataset == "cifar10":
        return load_cifar10(root, split, cache_dir=cache_dir, strict=strict, limit=limit)
    if dataset == "hf":
        return HFImageDataset(root, split, load_size or round(img_size * 256 / 224), *columns, limit=limit,
                              cache_dir=cache_dir, crop=crop)
    if dataset in ("folder", "shards"):
        sub = os.path.join(os.path.expanduser(root), split)
        load_size = load_size or round(img_size * 256 / 224)
        root = sub if os.path.isdir(sub) else root
        if dataset == "folder":
            return ImageFolder(root, load_size, limit, crop=crop)
        return ShardDataset(root, load_size, shuffle_buffer, limit, max_member_bytes, crop=crop)
    raise DataError(f"unknown dataset {dataset!r}; expected 'cifar10', 'folder', 'shards' or 'hf'")
