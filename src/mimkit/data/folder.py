"""Image folders: a safe scan (`walk_files`) and `ImageFolder`, whose files are decoded in loader workers."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.arrays import ARRAY_EXTENSIONS
from mimkit.data.crops import RandomResizedCrop, sample_image, split_key
from mimkit.data.decode import IMG_EXTENSIONS, BadImageError, DataError, Sample

FILE_EXTENSIONS = IMG_EXTENSIONS + ARRAY_EXTENSIONS

log = logging.getLogger(__name__)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_files(top: str, within: str | None = None, hidden: bool = True) -> Iterator[str]:
    """Paths of the regular files under `top`, sorted per directory, following directory links.

    Every directory is walked once, by its real path, so a link loop (or a second link to the same
    directory) ends instead of repeating files forever. Entries that are not regular files (FIFOs,
    devices, sockets, broken links) are skipped and counted in one warning. With `within` (a folder),
    nothing whose real path lies outside it is visited (links out of it are skipped and counted);
    without `hidden`, names starting with "." are left out."""
    root, seen, odd = within and os.path.realpath(within), set(), []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (root and not _inside(real, root)):
            dirnames[:] = []
            if real not in seen:
                odd.append(f"{dirpath} (outside {within})")
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if hidden or not d.startswith("."))
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            if not hidden and f.startswith("."):
                continue
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a broken link, a file deleted meanwhile
                regular = False
            if not regular:
                odd.append(path)
            elif root and not _inside(os.path.realpath(path), root):
                odd.append(f"{path} (outside {within})")
            else:
                yield path
    if odd:
        log.warning("skipped %d entries under %s that are not regular files inside it, e.g. %s", len(odd), top,
                    ", ".join(odd[:3]))


def spread(n: int, limit: int) -> list[int]:
    """Indices of `limit` samples evenly spaced over n sorted ones (all when limit is 0 or >= n),
    so that a limited run still sees every class of a dataset sorted by class."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


class ImageFolder(Dataset):
    """Images under `root`, sorted; label = index of the first-level subfolder (`classes`).

    Without subfolders every image directly in root gets label 0; with subfolders, files
    directly in root are ignored (as in torchvision). Files and folders starting with "." are
    skipped (macOS `._x.jpg` companions are not images), and so are entries that are not regular
    files; link loops end (see `walk_files`). With `confine`, nothing outside root is listed, links
    out of it included. Decoding happens in `__getitem__`, so in loader workers: `dataset[i]` resizes
    the shorter side to `load_size` and center-crops a square (evaluation, pictures); with a `crop`,
    `dataset[i, key]` is the training crop of sample i in the epoch `key` (`crops.RandomResizedCrop`),
    what the loader asks for when the dataset has one (`loader.make_loader`).
    """

    def __init__(self, root: str, load_size: int | tuple[int, int], limit: int = 0, confine: bool = False,
                 crop: RandomResizedCrop | None = None, channels: int = 3):
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root, self.load_size, self.crop, self.channels = root, load_size, crop, channels
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                              and (not confine or _inside(os.path.realpath(e.path), os.path.realpath(root))))
        if self.classes:
            files = [(p, label) for label, c in enumerate(self.classes) for p in _scan(root, c, confine)]
        else:
            self.classes = [os.path.basename(os.path.normpath(root))]
            files = [(p, 0) for p in _scan(root, "", confine)]
        if not files:
            raise DataError(f"no image files ({' '.join(FILE_EXTENSIONS)}) found under {root}")
        files = [files[i] for i in spread(len(files), limit)]
        # One numpy bytes array instead of a list of str: forked workers reading a list touch
        # every object's refcount and copy the pages (pytorch/pytorch#13246).
        self._paths = np.array([os.fsencode(p) for p, _ in files])
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[i]))

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        i, epoch_key = split_key(key)
        path, label = self.path(i), int(self.labels[i])
        try:
            return Sample(sample_image(path, self.load_size, self.crop, epoch_key, i, self.channels), label, path)
        except BadImageError as e:
            return Sample(None, label, path, e.reason)


def _scan(root: str, sub: str, confine: bool) -> list[str]:
    """Sorted image paths under root/sub, relative to root (see `walk_files`; `confine` to root)."""
    paths = walk_files(os.path.join(root, sub), within=root if confine else None, hidden=False)
    return sorted(os.path.relpath(p, root) for p in paths if p.lower().endswith(FILE_EXTENSIONS))
