"""CIFAR-10: the shipped subset, a download, a python tarball or a JPEG folder, decoded once into memory
and cached on disk; checksums of the archives mimkit knows."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data.decode import IMG_EXTENSIONS, BadImageError, DataError, Sample, decode_image
from mimkit.data.folder import spread, walk_files
from mimkit.serialization import cifar_globals, unpickle

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BUILTIN_CIFAR10 = "cifar10_subset.tar.gz"  # in mimkit/assets; made by tools/make_cifar_subset.py
# Checked whenever a file with one of these names is read (on a cache miss) or downloaded.
KNOWN_CHECKSUMS = {
    "cifar-10-python.tar.gz": ("md5", "c58f30108f718f92721af3b95e74349a"),
    "cifar10-jpeg.tar.gz": ("sha256", "097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297"),
}
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CACHE_VERSION = 1  # bump when the cached arrays change meaning


class CIFAR10(Dataset):
    """A CIFAR-10 split in memory: `images` uint8 (N, 3, 32, 32), `labels` int64 (N,).

    `skipped` lists (name, reason) for files of the source that could not be decoded.
    """

    classes = list(CIFAR10_CLASSES)

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, split: str = "train", skipped: list | None = None
    ):
        self.images, self.labels, self.split = images, labels, split
        self.skipped: list[tuple[str, str]] = list(skipped or [])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.images[i], int(self.labels[i]), f"{self.split}/{i}")

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        # One gather per batch instead of one tensor index per item: at 32 px per-item overhead
        # is most of the loading cost. numpy's take is used as torch's index kernel measured
        # 4-70x slower on uint8 rows (CPU, 2 cores).
        images = torch.from_numpy(self.images.numpy()[indices]).unbind(0)
        labels = self.labels.numpy()[indices].tolist()
        return [Sample(x, y, f"{self.split}/{i}") for x, y, i in zip(images, labels, indices, strict=True)]


def load_cifar10(
    root: str = "builtin", split: str = "train", *, cache_dir: str | None = "~/.cache/mimkit",
    strict: bool = False, limit: int = 0,
) -> CIFAR10:
    """Load a CIFAR-10 split into memory.

    root: "builtin" (the subset shipped with mimkit), "download" (the official python tarball,
    fetched into cache_dir), or a path to a .tar.gz or a directory holding either image-folder
    JPEGs (`[top/]train/<class>/*.jpg`, `[top/]test/<class>/*.jpg`) or the official pickled
    batches (`data_batch_1..5`, `test_batch`). Decoded arrays are cached in cache_dir (None: no
    cache), keyed by the source's path, size and mtime. Unreadable images are skipped and listed
    in `.skipped`; strict raises BadImageError for the first one. limit > 0 keeps N evenly spaced samples.
    """
    if split not in _CIFAR_BATCHES:
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    if root == "builtin":
        with resources.as_file(resources.files("mimkit") / "assets" / BUILTIN_CIFAR10) as path:
            ds = _load_cifar10(str(path), split, cache_dir, strict)
    else:
        if root == "download":
            root = download_cifar10(cache_dir or "~/.cache/mimkit")
        ds = _load_cifar10(os.path.expanduser(root), split, cache_dir, strict)
    keep = spread(len(ds.labels), limit)
    ds.images, ds.labels = ds.images[keep], ds.labels[keep]
    return ds


def _load_cifar10(src: str, split: str, cache_dir: str | None, strict: bool) -> CIFAR10:
    if not os.path.exists(src):
        raise FileNotFoundError(
            f"CIFAR-10 source not found: {src} (use 'builtin', 'download', a .tar.gz or a directory)"
        )
    cache = _cache_path(src, split, cache_dir) if cache_dir else None
    cached = _read_cache(cache) if cache else None
    if cached is not None:
        images, labels, skipped = cached
    else:
        if os.path.isfile(src):
            verify_checksum(src)
        images, labels, skipped = _read_cifar(src, split)
        if cache:
            _write_cache(cache, images, labels, skipped)
    if strict and skipped:
        raise BadImageError(*skipped[0])
    return CIFAR10(images, labels, split, skipped)


def _read_cifar(src: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Read one split from an archive or directory in either layout: images, labels, skipped."""
    batch_names = _CIFAR_BATCHES[split]

    def wanted(name: str) -> bool:
        parts = name.split("/")
        if parts[-1].startswith("."):
            return False
        if parts[-1] in batch_names:
            return True
        return (
            len(parts) >= 3 and parts[-3] == split and parts[-2] in CIFAR10_CLASSES
            and parts[-1].lower().endswith(IMG_EXTENSIONS)
        )

    batches, files = {}, []
    for name, data in _iter_files(src, wanted):
        base = name.rsplit("/", 1)[-1]
        if base in batch_names:
            batches[base] = _unpickle_batch(data, f"{src}:{name}")
        else:
            files.append((name, CIFAR10_CLASSES.index(name.split("/")[-2]), data))
    if not batches and not files:
        raise DataError(
            f"{src}: no CIFAR-10 {split} data found (expected {split}/<class>/*.jpg or the pickled "
            f"batches {', '.join(batch_names)})"
        )
    images = [batches[b][0] for b in batch_names if b in batches]
    labels = [batches[b][1] for b in batch_names if b in batches]
    files.sort()
    decoded, skipped = np.empty((len(files), 3, 32, 32), np.uint8), []
    keep = np.zeros(len(files), bool)
    for k, (name, _, data) in enumerate(files):
        try:
            image = decode_image(data)
            if image.shape != (3, 32, 32):
                raise BadImageError(name, f"expected 32x32 pixels, got {image.shape[2]}x{image.shape[1]}")
            decoded[k], keep[k] = image.numpy(), True
        except BadImageError as e:
            skipped.append((f"{src}:{name}", e.reason))
    images.append(decoded[keep])
    labels.append(np.array([label for _, label, _ in files], np.int64)[keep])
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), skipped


def _iter_files(src: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name with "/" separators, bytes) of the wanted regular files of a tar archive or directory."""
    if os.path.isdir(src):
        for path in walk_files(src):
            name = os.path.relpath(path, src).replace(os.sep, "/")
            if wanted(name):
                with open(path, "rb") as fh:
                    yield name, fh.read()
        return
    try:
        # Streaming mode ("r|*"): members are read in order straight from the compressed stream.
        with tarfile.open(src, "r|*") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{src}: cannot read as a tar archive ({type(e).__name__}: {e})") from e


def _unpickle_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A pickled CIFAR-10 batch -> images uint8 (n, 3, 32, 32), labels int64 (n,)."""
    try:
        d = unpickle(data, cifar_globals(), encoding="bytes")
        images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # any malformed pickle, as for images
        raise DataError(f"{name}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _cache_path(src: str, split: str, cache_dir: str) -> str:
    src = os.path.abspath(src)
    if os.path.isdir(src):  # a directory's own mtime misses edits deeper down, so list everything
        paths = list(walk_files(src))
        stamp = sorted((p, s.st_size, s.st_mtime_ns) for p, s in zip(paths, map(os.stat, paths), strict=True))
    else:
        st = os.stat(src)
        stamp = [(src, st.st_size, st.st_mtime_ns)]
    key = hashlib.sha256(repr((_CACHE_VERSION, src, split, stamp)).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir), f"cifar10-{split}-{key}.npz")


def _read_cache(path: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]] | None:
    try:
        with np.load(path) as z:
            return (
                torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                [(str(a), str(b)) for a, b in z["skipped"]],
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing or unreadable: decode again


def _write_cache(path: str, images: torch.Tensor, labels: torch.Tensor, skipped: list[tuple[str, str]]):
    # Write a temporary file and rename it, so a crash never leaves a half-written cache. A cache
    # that cannot be written (read-only home, full disk) only costs speed, so it warns.
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            skipped_array = np.array(skipped, dtype=str).reshape(-1, 2)
            np.savez(f, images=images.numpy(), labels=labels.numpy(), skipped=skipped_array)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"cannot write the CIFAR-10 cache {path}: {e}", stacklevel=4)
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def verify_checksum(path: str, name: str | None = None) -> None:
    """Raise ValueError if the file's digest differs from KNOWN_CHECKSUMS[name or its file name];
    files with other names are not checked."""
    known = KNOWN_CHECKSUMS.get(name or os.path.basename(path))
    if known is None:
        return
    algorithm, expected = known
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(
            f"{path}: {algorithm} is {digest.hexdigest()}, expected {expected}; the file is corrupt "
            f"or incomplete: delete it and fetch it again"
        )


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if need be; left in place) for the block: the
    processes torchrun starts together take turns. Where `fcntl` is missing (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_cifar10(cache_dir: str = "~/.cache/mimkit", url: str = CIFAR10_URL) -> str:
    """Download the official CIFAR-10 python tarball into cache_dir (once, even when several processes
    ask at the same time), verify its md5 and return its path."""
    dest = os.path.join(os.path.expanduser(cache_dir), "cifar-10-python.tar.gz")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with _exclusive(dest + ".lock"):  # the first process downloads; the others then find the file
        if not os.path.exists(dest):
            fd, part = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")  # renamed once verified
            try:
                with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
                verify_checksum(part, name=os.path.basename(dest))
                os.replace(part, dest)
            except (urllib.error.URLError, OSError) as e:
                raise OSError(
                    f"could not download {url} to {dest}: {e}; fetch it by hand and pass its path as data root"
                ) from e
            except ValueError as e:
                raise DataError(f"download of {url} failed verification: {e}") from None
            finally:
                if os.path.exists(part):
                    os.unlink(part)
    verify_checksum(dest)
    return dest
