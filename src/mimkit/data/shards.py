"""WebDataset tar shards: written from an image folder, streamed back split over ranks and loader workers.

A dataset too large for one disk is kept as many tar files that are read sequentially (large reads,
no per-file seeks) and can live on several disks. `mimkit data shard FOLDER OUT --shard-size N`
writes (the WebDataset convention: members of one sample share a key, the extension names the field):

    OUT/shard-000000.tar   000000.jpg 000000.cls 000001.png 000001.cls ...  (image bytes as they were;
    OUT/shard-000001.tar   ...                                               label as decimal text)
    OUT/index.json         {"format": "webdataset", "classes": [...], "num_samples": N,
                            "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...]}

With `--max-side N`, images whose longer side is larger than N are resized to N and stored as JPEG
(`--quality`, default 90; the index records "max_side", "jpeg_quality" and how many were "resized"),
FFCV's `max_resolution`: 512 keeps what RandomResizedCrop needs for 224-px crops, and a 12-MP photo
becomes a small file that decodes in a fraction of the time (BENCHMARKS.md). Other images are stored
as they were.

Samples are shuffled once when written, so every shard mixes the classes. The index gives the sample
counts that fix an epoch's length before anything is read. Shards moved to other disks keep working if
each folder has a copy of index.json (a shard is looked up by name in its own folder's index).

Reading (`ShardDataset`): an epoch is the concatenation of the shards in an order shuffled by
(seed, epoch). Each rank takes a contiguous range of that sequence and splits it between its loader
workers, so no sample is read twice; every worker shuffles its samples in blocks of `shuffle_buffer`
(a buffer whose permutation is seeded by (seed, epoch, position)), and decodes with the folder datasets'
`decode_image` and bad-file policy. Because everything is a function of positions, a run resumes
mid-epoch by skipping whole shards and undecoded samples.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import get_worker_info

from mimkit.data.arrays import is_array_file
from mimkit.data.crops import RandomResizedCrop, epoch_key, sample_image
from mimkit.data.decode import IMG_EXTENSIONS, BadImageError, DataError, Sample, open_image, to_rgb
from mimkit.data.folder import ImageFolder
from mimkit.data.loader import Stream

INDEX = "index.json"
FORMAT = "webdataset"
MAX_MEMBER_BYTES = 1 << 26  # the default bound on one member (data.max_member_bytes): 64 MiB
MAX_INDEX_BYTES = 1 << 26  # 64 MiB: an index of a million shards is ~50 MB
MAX_LABEL = 2**31 - 1
MAX_SHARD_SAMPLES = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Writing


def _add(tar: tarfile.TarFile, name: str, data: bytes | io.BufferedReader, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    info.mode, info.mtime = 0o444, 0  # fixed metadata: the same folder, the same bytes
    tar.addfile(info, io.BytesIO(data) if size is None else data)


def _add_file(tar: tarfile.TarFile, name: str, path: str) -> None:
    """Copy the regular file at `path` into `tar` as `name`, streamed (never read whole into memory);
    anything else there (a FIFO would block, a device never end) is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file (it changed after the folder was listed)")
        _add(tar, name, f, st.st_size)


def _shrunk(path: str, max_side: int, quality: int) -> bytes | None:
    """The image at `path` resized (bicubic, antialiased) to a longer side of `max_side` and encoded
    as JPEG at `quality`; None when it is no larger than that, or unreadable (then it is kept as it is)."""
    try:
        with open_image(path) as im:
            if max(im.size) <= max_side:
                return None
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            if im.format == "JPEG":
                im.draft(None, size)  # DCT scaling to no less than `size`
            small = to_rgb(im).resize(size, Image.Resampling.BICUBIC)
    except BadImageError:
        return None
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(folder: str, out: str, shard_size: int = 1000, seed: int = 0, max_side: int = 0,
                 quality: int = 90) -> dict:
    """Write the images under `folder` (an image folder: class sub-folders, or images directly in it)
    as tar shards of `shard_size` samples in `out`, in an order shuffled by `seed`, plus index.json.

    Files are stored as they are, unreadable ones included (readers count and skip them like folder
    datasets do); with `max_side`, an image whose longer side is larger is resized to it and stored
    as a JPEG of `quality` (the index records both), so that reading it back is cheap. Only regular
    files inside `folder` are read: links out of it, FIFOs and devices are skipped and counted (see
    `walk_files`). Each shard and the index are written to a temporary name and renamed. Returns the
    index."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if max_side < 0:
        raise DataError(f"max side must be >= 0 (0: every image as it is), got {max_side}")
    if not 1 <= quality <= 95:
        raise DataError(f"JPEG quality must be in 1 .. 95, got {quality}")
    source = ImageFolder(folder, load_size=0, confine=True)  # lists and labels the files; nothing is decoded
    arrays = [source.path(i) for i in range(len(source)) if is_array_file(source.path(i))]
    if arrays:
        raise DataError(f"shards hold RGB images, and {folder} holds {len(arrays)} array file(s) such as "
                        f"{arrays[0]}; train on the folder itself (data.dataset=folder)")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    os.makedirs(out, exist_ok=True)
    digits = max(6, len(str(len(order) - 1)))
    shards, resized = [], 0
    for first in range(0, len(order), shard_size):
        name = f"shard-{len(shards):06d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        chunk = order[first : first + shard_size]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, i in enumerate(chunk, start=first):
                path = source.path(i)
                ext = os.path.splitext(path)[1].lower()
                ext = ".jpg" if ext == ".jpeg" else ext
                small = _shrunk(path, max_side, quality) if max_side else None
                if small is None:
                    _add_file(tar, f"{key:0{digits}d}{ext}", path)
                else:
                    _add(tar, f"{key:0{digits}d}.jpg", small)
                    resized += 1
                _add(tar, f"{key:0{digits}d}.cls", str(int(source.labels[i])).encode())
        os.replace(tmp, os.path.join(out, name))
        shards.append({"name": name, "num_samples": len(chunk)})
    index = {"format": FORMAT, "classes": list(source.classes), "num_samples": len(order), "shards": shards}
    if max_side:
        index.update(max_side=max_side, jpeg_quality=quality, resized=resized)
    tmp = os.path.join(out, INDEX + ".tmp")
    Path(tmp).write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, os.path.join(out, INDEX))
    return index


# ---------------------------------------------------------------------------------------------
# Finding shards


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `a{0..2}b` -> a0b a1b a2b (zero padding kept: {000..010}),
    `{x,y}` -> x y; nested and repeated braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def _plain_name(name: object) -> bool:
    """A file name with no path components: what index.json may name and a shard member may be called."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _read_index(folder: str) -> dict:
    """index.json of a shard folder, checked: every shard a plain file name in the folder with a count."""
    path = os.path.join(folder, INDEX)
    try:
        if os.stat(path).st_size > MAX_INDEX_BYTES:
            raise DataError(f"{path}: larger than {MAX_INDEX_BYTES} bytes; not a shard index")
        index = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard index (write shards with `mimkit data shard FOLDER OUT`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise DataError(f"{path}: not a mimkit shard index (a JSON object with format {FORMAT!r} and a shards list)")
    for i, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or not _plain_name(shard.get("name")):
            raise DataError(f"{path}: shards[{i}] must name a file in this folder (no path components), "
                            f"got {shard!r:.200}")
        n = shard.get("num_samples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_SHARD_SAMPLES:
            raise DataError(f"{path}: shards[{i}] ({shard['name']}): num_samples must be an integer in "
                            f"0 .. {MAX_SHARD_SAMPLES}, got {n!r:.100}")
    classes = index.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: classes must be a list of names")
    return index


def find_shards(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(shard path, samples) in order, and the class names, for a shard folder or a brace/glob pattern
    of shard files; every count comes from index.json in the shard's folder."""
    root = os.path.expanduser(root)
    if os.path.isdir(root):
        index = _read_index(root)
        shards = [(os.path.join(root, s["name"]), s["num_samples"]) for s in index["shards"]]
        classes = list(index.get("classes", []))
    else:
        paths = sorted({p for part in expand_braces(root) for p in (glob.glob(part) or [part])})
        indexes: dict[str, dict] = {}
        shards, classes = [], None
        for path in paths:
            folder = os.path.dirname(path) or "."
            if folder not in indexes:
                indexes[folder] = _read_index(folder)
                counts = {s["name"]: s["num_samples"] for s in indexes[folder]["shards"]}
                indexes[folder]["counts"] = counts
                theirs = list(indexes[folder].get("classes", []))
                if classes is not None and theirs != classes:
                    raise DataError(f"{folder}/{INDEX}: its classes differ from the other shard folders'")
                classes = theirs
            name = os.path.basename(path)
            if name not in indexes[folder]["counts"]:
                raise DataError(f"{path}: not listed in {os.path.join(folder, INDEX)}")
            shards.append((path, indexes[folder]["counts"][name]))
        classes = classes or []
    missing = [p for p, _ in shards if not os.path.isfile(p)]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise FileNotFoundError(f"shard file(s) not found: {', '.join(missing[:5])}{more}")
    if not shards:
        raise DataError(f"no shards found at {root}")
    return shards, classes


# ---------------------------------------------------------------------------------------------
# Reading


def _hash_seed(*parts: int) -> int:
    key = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(key[:8], "little")


BAD = "!"  # the field of a sample holding why a member of it was not read


def _samples_of(path: str, skip: int, count: int, max_bytes: int = MAX_MEMBER_BYTES,
                ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(member-name stem, {extension: bytes}) for samples skip .. skip + count - 1 of a shard, read as
    a stream; the data of skipped samples is never read. A shard that ends early (truncated, corrupt)
    yields what it has and then empty samples, so that counts and positions stay right. A member
    larger than `max_bytes` or whose name has path components is not read: its sample's `BAD`
    field says why (the sample is then counted as unreadable)."""
    done, key, fields = 0, None, {}
    try:
        with tarfile.open(path, "r|") as tar:
            seen = -1
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                stem, _, ext = name.partition(".")
                if stem != key:
                    if key is not None and seen >= skip:
                        yield key, fields
                        done += 1
                        if done == count:
                            return
                    key, fields, seen = stem, {}, seen + 1
                if seen < skip:
                    continue
                if member.name != name or name.startswith("."):
                    fields[BAD] = f"member name {member.name!r:.200} is not a plain file name".encode()
                elif member.size > max_bytes:
                    fields[BAD] = (f"member {member.name} is {member.size} bytes, more than data.max_member_bytes "
                                   f"({max_bytes})").encode()
                else:
                    fields[ext.lower()] = tar.extractfile(member).read()
            if key is not None and seen >= skip and done < count:
                yield key, fields
                done += 1
    except (tarfile.TarError, EOFError, OSError):
        pass
    for i in range(done, count):
        yield f"#{skip + i}", {}


_LABEL = re.compile(rb"\s*(\d{1,10})\s*")


def _decode(path: str, stem: str, fields: dict[str, bytes], load_size: int, num_classes: int = 0,
            crop: RandomResizedCrop | None = None, key: int | None = None, position: int = 0) -> Sample:
    """A sample's image (`crops.sample_image`: resized to `load_size` and center-cropped, or with an
    epoch `key` the training crop for its `position` in the epoch), or why not; its label from the `cls`
    field (-1 when there is none), which must lie in 0 .. num_classes - 1 (any 32-bit label when the
    index lists no classes)."""
    image_ext = next((e for e in fields if "." + e in IMG_EXTENSIONS), None)
    where = f"{path}:{stem}.{image_ext or '?'}"
    label, bad = -1, fields.get(BAD, b"").decode()
    if "cls" in fields:
        match = _LABEL.fullmatch(fields["cls"])
        label = int(match[1]) if match else -1
        top = num_classes - 1 if num_classes else MAX_LABEL
        if not 0 <= label <= top:
            label, bad = -1, bad or f"label {fields['cls'][:20]!r} is not an integer in 0 .. {top}"
    if bad:
        return Sample(None, label, where, bad)
    if image_ext is None:
        reason = "no image in this sample" if fields else "missing from the shard (truncated or corrupt tar?)"
        return Sample(None, label, where, reason)
    try:
        return Sample(sample_image(fields[image_ext], load_size, crop, key, position), label, where)
    except BadImageError as e:
        return Sample(None, label, where, e.reason)


class ShardDataset(Stream):
    """Samples streamed from tar shards (see the module docstring), uint8 (3, S, S) like `ImageFolder`:
    resized to `load_size` and center-cropped, or with a `crop`, each sample's training crop, drawn for
    its position in the epoch's sequence (`crops.RandomResizedCrop`).

    `split(rank, world_size, batch_size, seed, shuffle)` gives the view one rank iterates (what
    `make_loader` does); the dataset itself is rank 0 of 1, unshuffled. In a view with `batch_size` > 0,
    every rank yields the same number of whole batches per epoch and the loader's workers take turns
    batch by batch (the order `DataLoader` reads them in); the few samples left over (fewer than
    world_size x batch_size) are left out of that epoch, different ones each epoch. With `batch_size`
    0 every sample is yielded exactly once per epoch, ranks differing by at most one.
    """

    def __init__(self, root: str, load_size: int, shuffle_buffer: int = 1000, limit: int = 0,
                 max_member_bytes: int = MAX_MEMBER_BYTES, crop: RandomResizedCrop | None = None):
        self.root, self.load_size, self.shuffle_buffer, self.crop = root, load_size, shuffle_buffer, crop
        self.max_member_bytes = max_member_bytes
        self.shards, self.classes = find_shards(root)
        if limit:  # the first `limit` samples in shard order (shards were shuffled when written)
            kept, left = [], limit
            for path, n in self.shards:
                if left > 0:
                    kept.append((path, min(n, left)))
                    left -= n
            self.shards = kept
        self.num_samples = sum(n for _, n in self.shards)

    def __len__(self) -> int:
        """Samples this view yields per epoch, over all its workers."""
        lo, hi = self._rank_range()
        return hi - lo

    def _rank_range(self) -> tuple[int, int]:
        n, r, w = self.num_samples, self.rank, self.world_size
        if not self.batch_size:
            return r * n // w, (r + 1) * n // w
        per_rank = (n // w) // self.batch_size * self.batch_size
        return r * per_rank, (r + 1) * per_rank

    def _worker_range(self, worker: int, workers: int) -> tuple[int, int, int]:
        """(first, end) positions in the epoch's sequence of what loader worker `worker` reads, and how
        many of them to skip when resuming at `start`.

        Batch j of an epoch comes from share j % workers (the DataLoader asks its workers in turn), so
        after `done` batches the next one is share done % workers's; a resumed loader starts asking at
        worker 0, so worker w takes over share (w + done) % workers."""
        lo, hi = self._rank_range()
        if not self.batch_size:
            n = hi - lo
            return lo + worker * n // workers, lo + (worker + 1) * n // workers, 0
        bs, batches = self.batch_size, (hi - lo) // self.batch_size
        done = self.start // bs
        share = (worker + done) % workers
        q, rem = divmod(batches, workers)
        first = lo + bs * (share * q + min(share, rem))
        mine = q + (share < rem)
        skip = max(0, -(-(done - share) // workers)) * bs  # batches j < done with j % workers == share
        return first, first + mine * bs, skip

    def _epoch_shards(self) -> list[tuple[str, int]]:
        if not self.shuffle:
            return self.shards
        g = torch.Generator().manual_seed(_hash_seed(self.seed, self.epoch))
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def _read(self, shards: list[tuple[str, int]], first: int, end: int) -> Iterator[tuple[str, str, dict]]:
        """Undecoded samples at positions first .. end - 1 of the sequence `shards` make."""
        offset = 0
        for path, n in shards:
            lo, hi = max(first, offset), min(end, offset + n)
            if lo < hi:
                for stem, fields in _samples_of(path, lo - offset, hi - lo, self.max_member_bytes):
                    yield path, stem, fields
            offset += n
            if offset >= end:
                return

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, end, skip = self._worker_range(worker, workers)
        shards, size = self._epoch_shards(), self.shuffle_buffer
        key = None if self.crop is None else epoch_key(self.seed, self.epoch)  # None: no training crops
        block = skip // size  # whole blocks before the resume point are not even read
        for lo in range(first + block * size, end, size):
            raw = list(enumerate(self._read(shards, lo, min(lo + size, end)), start=lo))
            if self.shuffle:  # the buffer: a permutation seeded by (seed, epoch, where the block starts)
                g = torch.Generator().manual_seed(_hash_seed(self.seed, self.epoch, lo))
                raw = [raw[i] for i in torch.randperm(len(raw), generator=g).tolist()]
            if lo == first + block * size:
                raw = raw[skip - block * size :]
            for position, (path, stem, fields) in raw:  # a crop is drawn for the sample's place in the epoch
                yield _decode(path, stem, fields, self.load_size, len(self.classes), self.crop, key, position)

    def first(self, n: int) -> list[Sample]:
        """The first `n` samples in shard order (e.g. for a fixed set of pictures)."""
        return [_decode(p, s, f, self.load_size, len(self.classes))
                for p, s, f in self._read(self.shards, 0, min(n, self.num_samples))]
