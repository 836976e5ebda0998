"""Data: datasets yielding images (uint8, or float32 for data of more bits), batched device transforms,
resumable loading.

decode (one file to pixels; what unreadable means) <- arrays (any channel count and bit depth) <-
crops (the pretraining crop of one file) <- folder,
cifar <- shards <- datasets (which one a config names) <- loader; transforms work on batches on the device."""

from mimkit.data.cifar import CIFAR10, CIFAR10_CLASSES, download_cifar10, load_cifar10, verify_checksum
from mimkit.data.crops import RandomResizedCrop
from mimkit.data.datasets import build_dataset, dataset_of
from mimkit.data.decode import IMG_EXTENSIONS, BadImageError, DataError, Sample, decode_image
from mimkit.data.folder import ImageFolder, spread, walk_files
from mimkit.data.loader import ResumableSampler, check_skipped, collate, make_loader, set_epoch, stop_workers
from mimkit.data.shards import ShardDataset, write_shards
from mimkit.data.transforms import EvalTransform, PretrainAugment, normalize

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "IMG_EXTENSIONS",
    "BadImageError",
    "DataError",
    "EvalTransform",
    "ImageFolder",
    "PretrainAugment",
    "RandomResizedCrop",
    "ResumableSampler",
    "Sample",
    "ShardDataset",
    "build_dataset",
    "dataset_of",
    "check_skipped",
    "collate",
    "decode_image",
    "download_cifar10",
    "load_cifar10",
    "make_loader",
    "normalize",
    "set_epoch",
    "spread",
    "stop_workers",
    "verify_checksum",
    "walk_files",
    "write_shards",
]
