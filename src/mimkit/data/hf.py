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

import torch
from torch.utils.data import Dataset

from mimkit.data.crops import RandomResizedCrop, sample_image, split_key
from mimkit.data.decode import BadImageError, DataError, Sample
from mimkit.data.folder import spread


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.dataset=hf needs the datasets library: pip install 'mimkit[datasets]'") from None
    return datasets


def load_hf_dataset(root: str, split: str, cache_dir: str | None = None):
    """The `datasets.Dataset` of `split` at `root` (see the module docstring)."""
    datasets = _datasets()
    path = os.path.expanduser(root)
    cache = os.path.join(os.path.expanduser(cache_dir), "datasets") if cache_dir else None
    try:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(path)
        elif os.path.isdir(path):
            for kind in ("parquet", "arrow"):
                files = (sorted(glob.glob(os.path.join(path, split, f"*.{kind}")))
                         or sorted(glob.glob(os.path.join(path, f"{split}*.{kind}")))
                         or sorted(glob.glob(os.path.join(path, f"*.{kind}"))))
                if files:
                    ds = datasets.load_dataset(kind, data_files={split: files}, cache_dir=cache)
                    break
            else:
                raise DataError(f"{path}: neither a saved dataset (save_to_disk) nor a folder of parquet or arrow "
                                "files")
        else:
            ds = datasets.load_dataset(root, cache_dir=cache)
    except DataError:
        raise
    except Exception as e:  # the library's errors: no such dataset, offline and not cached, a damaged file
        raise DataError(f"data.root={root}: cannot load it with datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.root={root}: no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


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
        value = self.ds[row][self.image_column]
        src = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
        if not isinstance(src, (bytes, str)) or not src:
            return Sample(None, label, where, f"column {self.image_column!r} holds no image bytes or path")
        try:
            image = sample_image(src, self.load_size, self.crop, epoch_key, i)
        except BadImageError as e:
            return Sample(None, label, where, e.reason)
        return Sample(image, label, where)
