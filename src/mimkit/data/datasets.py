"""Datasets that yield uint8 images: image folders (decoded in loader workers) and CIFAR-10
(decoded once into memory, cached on disk).

Every item is a `Sample(image, label, path, reason)`: `image` is uint8 (3, S, S) with the same
S for the whole dataset, or None when the file is unreadable, `reason` saying why. Unreadable
files never raise inside a worker; `loader.collate` drops and lists them, and the training
loop decides (count and report, or raise `BadImageError` in strict mode).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from mimkit.serialization import cifar_globals, unpickle

if TYPE_CHECKING:
    from mimkit.config import DataConfig

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
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
# Larger images are refused before their pixels are decoded (a decompression bomb is a few KB of PNG
# that decodes to gigabytes): 2^28 pixels is 16384 x 16384, 768 MiB as RGB.
MAX_IMAGE_PIXELS = 1 << 28
MAX_MEMBER_BYTES = 1 << 26  # the default bound on one member of a tar shard (data.max_member_bytes): 64 MiB


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
    """One dataset item; `image` is uint8 (3, S, S), or None with `reason` when unreadable."""

    image: torch.Tensor | None
    label: int
    path: str
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(src: str | os.PathLike | bytes, size: int = 0) -> torch.Tensor:
    """Decode an image file (path or bytes) of any mode to RGB uint8 (3, H, W).

    With size > 0, resize the shorter side to `size` (bicubic, antialiased) and center-crop a
    size x size square. Raises BadImageError for anything unreadable.
    """
    src = src if isinstance(src, bytes) else os.fspath(src)
    name = src if isinstance(src, str) else "<bytes>"
    try:
        if (len(src) if isinstance(src, bytes) else os.path.getsize(src)) == 0:
            raise BadImageError(name, "empty file")
        with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadImageError(name, f"{im.width} x {im.height} pixels, more than MAX_IMAGE_PIXELS "
                                          f"({MAX_IMAGE_PIXELS})")
            rgb = _to_rgb(im)  # convert() loads the pixels, so truncated data raises here
        if size and rgb.size != (size, size):
            # Resizing the central square straight to size x size is Resize(size) + CenterCrop(size)
            # without resampling the pixels the crop throws away.
            w, h = rgb.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        array = np.array(rgb, dtype=np.uint8)  # (H, W, 3)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not a recognised image format") from None
    except Exception as e:  # PIL's plugins raise many types on corrupt data (OSError, struct.error, ...)
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb(im: Image.Image) -> Image.Image:
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


# ---------------------------------------------------------------------------------------------
# Image folders


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
    out of it included. Decoding happens in `__getitem__`, so in loader workers: shorter side resized
    to `load_size`, center-cropped square.
    """

    def __init__(self, root: str, load_size: int, limit: int = 0, confine: bool = False):
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root, self.load_size = root, load_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                              and (not confine or _inside(os.path.realpath(e.path), os.path.realpath(root))))
        if self.classes:
            files = [(p, label) for label, c in enumerate(self.classes) for p in _scan(root, c, confine)]
        else:
            self.classes = [os.path.basename(os.path.normpath(root))]
            files = [(p, 0) for p in _scan(root, "", confine)]
        if not files:
            raise DataError(f"no image files ({' '.join(IMG_EXTENSIONS)}) found under {root}")
        files = [files[i] for i in spread(len(files), limit)]
        # One numpy bytes array instead of a list of str: forked workers reading a list touch
        # every object's refcount and copy the pages (pytorch/pytorch#13246).
        self._paths = np.array([os.fsencode(p) for p, _ in files])
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[i]))

    def __getitem__(self, i: int) -> Sample:
        path, label = self.path(i), int(self.labels[i])
        try:
            return Sample(decode_image(path, self.load_size), label, path)
        except BadImageError as e:
            return Sample(None, label, path, e.reason)


def _scan(root: str, sub: str, confine: bool) -> list[str]:
    """Sorted image paths under root/sub, relative to root (see `walk_files`; `confine` to root)."""
    paths = walk_files(os.path.join(root, sub), within=root if confine else None, hidden=False)
    return sorted(os.path.relpath(p, root) for p in paths if p.lower().endswith(IMG_EXTENSIONS))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


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


# ---------------------------------------------------------------------------------------------


def dataset_of(d: DataConfig, img_size: int, split: str | None = None, limit: int | None = None,
               strict: bool | None = None):
    """`build_dataset` for the data section `d`, for a model of `img_size`; `split`, `limit` and
    `strict` replace d's."""
    return build_dataset(d.dataset, d.root, split or d.split, img_size, load_size=d.load_size,
                         strict=d.strict if strict is None else strict, cache_dir=d.cache_dir,
                         limit=d.limit if limit is None else limit, shuffle_buffer=d.shuffle_buffer,
                         max_member_bytes=d.max_member_bytes)


def build_dataset(
    dataset: str, root: str, split: str, img_size: int, *, load_size: int = 0, strict: bool = False,
    cache_dir: str | None = "~/.cache/mimkit", limit: int = 0, shuffle_buffer: int = 1000,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> ImageFolder | CIFAR10:
    """The dataset a DataConfig describes.

    "cifar10": see load_cifar10 (images stay 32x32; the augmentation resizes to img_size).
    "folder": ImageFolder over root/split if that folder exists, else root, decoding to
    load_size (0: round(img_size * 256 / 224), MAE's resize-then-crop ratio).
    "shards": a ShardDataset stream (mimkit.data.shards) over root/split if that folder exists, else
    root (a shard folder or a brace/glob pattern), decoding like "folder".
    """
    if dataset == "cifar10":
        return load_cifar10(root, split, cache_dir=cache_dir, strict=strict, limit=limit)
    if dataset in ("folder", "shards"):
        sub = os.path.join(os.path.expanduser(root), split)
        load_size = load_size or round(img_size * 256 / 224)
        root = sub if os.path.isdir(sub) else root
        if dataset == "folder":
            return ImageFolder(root, load_size, limit)
        from mimkit.data.shards import ShardDataset  # shards.py imports this module

        return ShardDataset(root, load_size, shuffle_buffer, limit, max_member_bytes)
    raise DataError(f"unknown dataset {dataset!r}; expected 'cifar10', 'folder' or 'shards'")
