"""Hugging Face `datasets` as a data source (`data.dataset=hf`): images and labels from a saved dataset,
a folder of parquet or arrow files, or a Hub dataset id, read through the `datasets` library.

`data.root` is a directory written by `save_to_disk` (a Dataset or a DatasetDict), a directory of
`*.parquet` / `*.arrow` files (the split's files: `root/split/` or files named after it, else all),
or a Hub id such as `uoft-cs/cifar10`, downloaded into the `datasets` cache or taken from it
(HF_DATASETS_OFFLINE=1: the cache alone). `data.image_column` holds the images (an `Image` feature,
or bytes / paths), `data.label_column` the labels (a `ClassLabel` names the classes; absent: all 0).
Arrow tables are memory-mapped, so forked loader workers share them; every item is decoded in the
worker by mimkit's own decoder, with its bad-file policy, training crops and resumable sampling, as
for image folders.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, get_worker_info

from mimkit.data.crops import RandomResizedCrop, epoch_key, sample_image, split_key
from mimkit.data.decode import BadImageError, DataError, Sample
from mimkit.data.folder import spread
from mimkit.data.loader import Stream


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset=hf needs the datasets library: pip install 'mimkit[datasets]'") from None
    return datasets


def _source(root: str, split: str) -> tuple[str, object]:
    """What `data.root` names: ("disk", path) for a save_to_disk folder, ("parquet" | "arrow", files) for a
    folder of files (the split's: `root/split/`, files named after it, else all), or ("hub", id)."""
    path = os.path.expanduser(root)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        return "disk", path
    if os.path.isdir(path):
        for kind in ("parquet", "arrow"):
            files = (sorted(glob.glob(os.path.join(path, split, f"*.{kind}")))
                     or sorted(glob.glob(os.path.join(path, f"{split}*.{kind}")))
                     or sorted(glob.glob(os.path.join(path, f"*.{kind}"))))
            if files:
                return kind, files
        raise DataError(f"{path}: neither a saved dataset (save_to_disk) nor a folder of parquet or arrow files")
    return "hub", root


def _pick_split(ds, root: str, split: str):
    datasets = _datasets()
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise DataError(f"data.root={root}: no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


def _library_call(root: str, fn):
    """`fn()`, the library's errors (no such dataset, offline and not cached, a damaged file) as one line."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data.root={root}: cannot load it with datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def load_hf_dataset(root: str, split: str, cache_dir: str | None = None):
    """The `datasets.Dataset` of `split` at `root` (see the module docstring)."""
    datasets = _datasets()
    cache = os.path.join(os.path.expanduser(cache_dir), "datasets") if cache_dir else None
    kind, where = _source(root, split)

    def load():
        if kind == "disk":
            return datasets.load_from_disk(where)
        if kind == "hub":
            return datasets.load_dataset(where, cache_dir=cache)
        return datasets.load_dataset(kind, data_files={split: where}, cache_dir=cache)
    return _pick_split(_library_call(root, load), root, split)


def open_stream(root: str, split: str, cache_dir: str | None = None):
    """(`datasets.IterableDataset` of `split` at `root`, its number of rows), read as a stream: files as they
    are (no arrow cache is built), a Hub id from the Hub (see the module docstring)."""
    datasets = _datasets()
    kind, where = _source(root, split)

    def load():
        if kind == "disk":  # memory-mapped already; streamed for the same code path
            ds = _pick_split(datasets.load_from_disk(where), root, split)
            return ds.to_iterable_dataset(), len(ds)
        if kind == "hub":
            ds = _pick_split(datasets.load_dataset(where, streaming=True), root, split)
            splits = ds.info.splits or {}
            if split not in splits or not splits[split].num_examples:
                raise DataError(f"data.root={root}: the Hub dataset does not state how many rows split {split!r} "
                                "has, which an epoch needs; use it without data.streaming")
            return ds, splits[split].num_examples
        ds = datasets.load_dataset(kind, data_files={split: where}, split=split, streaming=True)
        return ds, sum(_rows_in(kind, f) for f in where)
    return _library_call(root, load)


def _rows_in(kind: str, path: str) -> int:
    """Rows of a parquet file (from its footer) or of an arrow stream file (its record batches' lengths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(path) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def _image_source(value) -> bytes | str | None:
    """The bytes or path an image cell holds (an `Image(decode=False)` dict, bytes or a path)."""
    src = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
    return src if isinstance(src, (bytes, str)) and src else None


def _decode_row(value, label: int, where: str, column: str, load_size, crop, key, position: int) -> Sample:
    src = _image_source(value)
    if src is None:
        return Sample(None, label, where, f"column {column!r} holds no image bytes or path")
    try:
        return Sample(sample_image(src, load_size, crop, key, position), label, where)
    except BadImageError as e:
        return Sample(None, label, where, e.reason)


class HFImageDataset(Dataset):
    """Images and labels of a `datasets.Dataset`, decoded in loader workers like `ImageFolder`: `ds[i]`
    resized to `load_size` and center-cropped; with a `crop`, `ds[i, key]` is sample i's training crop."""

    def __init__(self, root: str, split: str, load_size: int, image_column: str = "image",
                 label_column: str = "label", limit: int = 0, cache_dir: str | None = None,
                 crop: RandomResizedCrop | None = None):
        datasets = _datasets()
        ds = load_hf_dataset(root, split, cache_dir)
        if image_column not in ds.column_names:
            raise DataError(f"data.image_column: {root} has no column {image_column!r} (its columns: "
                            f"{', '.join(ds.column_names)})")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes and paths; mimkit decodes
        if len(ds) == 0:
            raise DataError(f"data.root={root}: split {split!r} holds no rows")
        feature = ds.features.get(label_column)
        if label_column in ds.column_names:
            labels = torch.tensor(ds[label_column], dtype=torch.int64)
        else:
            labels = torch.zeros(len(ds), dtype=torch.int64)
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else \
            [str(c) for c in range(int(labels.max()) + 1)]
        keep = spread(len(ds), limit)
        self.rows, self.labels = keep, labels[keep]
        self.ds = ds.select_columns([image_column])
        self.root, self.image_column, self.load_size, self.crop = root, image_column, load_size, crop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        i, epoch_key = split_key(key)
        row, label = self.rows[i], int(self.labels[i])
        where = f"{self.root}[{row}]"
        return _decode_row(self.ds[row][self.image_column], label, where, self.image_column, self.load_size,
                           self.crop, epoch_key, i)


class HFStream(Stream):
    """`data.streaming`: the split of a Hugging Face dataset read as a stream (`open_stream`), decoded in the
    loader workers like `HFImageDataset`, for datasets too large to convert or download first.

    An epoch is one pass over `datasets`' own stream: shuffled (shards, then a buffer of `shuffle_buffer`
    rows) with the run's seed and the epoch number (`IterableDataset.set_epoch`), so every process and
    loader worker reads the same sequence. Global batch b goes to rank b % world_size; a rank's batches
    go to its loader workers in turn, the order `DataLoader` reads them in, so a run is the same
    whatever its workers. Every worker reads the whole stream and decodes its own rows only. Resuming
    (`set_epoch(epoch, start)`) reads past the rows already trained on without decoding them. The
    leftover rows of an epoch (fewer than world_size x batch_size) are left out, as `drop_last` does.
    The label column must be a `ClassLabel` (its names are the classes) or absent. An unreadable row is
    named by the file name its image cell records, else by its place in the epoch (so a run counts it
    once per epoch).
    """

    def __init__(self, root: str, split: str, load_size: int | tuple[int, int], image_column: str = "image",
                 label_column: str = "label", shuffle_buffer: int = 1000, limit: int = 0,
                 cache_dir: str | None = None, crop: RandomResizedCrop | None = None):
        datasets = _datasets()
        ds, rows = open_stream(root, split, cache_dir)
        features = ds.features or {}
        if image_column not in features:
            raise DataError(f"data.image_column: {root} has no column {image_column!r} (its columns: "
                            f"{', '.join(features)})")
        if isinstance(features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        label = features.get(label_column)
        if label is not None and not isinstance(label, datasets.ClassLabel):
            raise DataError(f"data.label_column: {label_column!r} of {root} is not a ClassLabel, so a stream cannot "
                            "know its classes; cast it (Dataset.cast_column) or read it without data.streaming")
        self.classes = list(label.names) if label is not None else ["0"]
        self.ds = ds.select_columns([image_column] + ([label_column] if label is not None else []))
        self.num_samples = min(rows, limit) if limit else rows
        if self.num_samples == 0:
            raise DataError(f"data.root={root}: split {split!r} holds no rows")
        self.root, self.image_column, self.label_column = root, image_column, label_column if label else None
        self.load_size, self.crop, self.shuffle_buffer = load_size, crop, shuffle_buffer

    def __len__(self) -> int:
        """Rows this view yields per epoch, over all its workers."""
        n, r, w = self.num_samples, self.rank, self.world_size
        if not self.batch_size:
            return len(range(r, n, w))
        return (n // (w * self.batch_size)) * self.batch_size

    def _stream(self, shuffle: bool) -> Iterator[tuple[int, dict]]:
        """(position, row) of the epoch's sequence: the same in every process and worker."""
        ds = self.ds
        if shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(self.epoch)
        # `iter`, not `__iter__`: the library's own iterator would give each loader worker some of the shards.
        position = 0
        for batch in ds.take(self.num_samples).iter(batch_size=256):
            for values in zip(*batch.values(), strict=True):
                yield position, dict(zip(batch, values, strict=True))
                position += 1

    def _row(self, row: dict, position: int, key: int | None) -> Sample:
        """Row `position` of the epoch's sequence, named by the file name its image cell records, else by that
        position (a stream has no stable row numbers)."""
        label, value = int(row[self.label_column]) if self.label_column else 0, row[self.image_column]
        name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        where = f"{self.root}[{name or f'row {position} of epoch {self.epoch}'}]"
        return _decode_row(value, label, where, self.image_column, self.load_size, self.crop, key, position)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        key = None if self.crop is None else epoch_key(self.seed, self.epoch)
        world, bs = self.world_size, self.batch_size
        if not bs:  # every row once: the rank's rows in turn to its workers
            for p, row in self._stream(self.shuffle):
                if p % world == self.rank and (p // world) % workers == worker:
                    yield self._row(row, p, key)
            return
        batches, done = len(self) // bs, self.start // bs
        for p, row in self._stream(self.shuffle):
            b = p // bs
            k = b // world  # the rank's batch number
            if k >= batches:
                return
            # a resumed loader asks worker 0 first: worker w serves the rank's batches done + w, done + w + workers..
            if b % world == self.rank and k >= done and (k - done) % workers == worker:
                yield self._row(row, p, key)

    def first(self, n: int) -> list[Sample]:
        """The first `n` rows in stored order (e.g. for a fixed set of pictures)."""
        rows = []
        for p, row in self._stream(False):
            if p >= n:
                break
            rows.append(self._row(row, p, None))
        return rows
