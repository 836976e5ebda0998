"""Hugging Face `datasets` as a data source, offline: saved datasets, parquet folders, bad rows,
training crops, exact resume and evaluation through the shared paths."""

import io
import json

import numpy as np
import pytest
import torch
from resumed import equal_weights, interrupt_and_resume

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.data import DataError, build_dataset, make_loader, set_epoch
from mimkit.data.crops import RandomResizedCrop
from mimkit.train.loop import pretrain

datasets = pytest.importorskip("datasets")  # the datasets extra; dev installs it
N = 40


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict saved with save_to_disk (train: 40 rows, one of them not an image; test: 20 rows),
    and the same train split as a parquet folder."""
    root = tmp_path_factory.mktemp("hfdata")
    features = datasets.Features({"img": datasets.Image(), "cls": datasets.ClassLabel(names=["cat", "dog", "fox"])})

    def split(n, offset):
        images = [{"bytes": _jpeg(offset + i), "path": None} for i in range(n)]
        if offset == 0:
            images[7] = {"bytes": b"not a jpeg", "path": None}
        return datasets.Dataset.from_dict({"img": images, "cls": [i % 3 for i in range(n)]}, features=features)

    dd = datasets.DatasetDict({"train": split(N, 0), "test": split(20, 1000)})
    dd.save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    dd["train"].to_parquet(str(root / "parquet" / "train-00000.parquet"))
    return root


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_rows_decode_like_a_folder_and_a_bad_row_is_counted(saved, layout, tmp_path):
    ds = build_dataset("hf", str(saved / layout), "train", 32, load_size=36, columns=("img", "cls"),
                       cache_dir=str(tmp_path))
    assert len(ds) == N and ds.classes == ["cat", "dog", "fox"] and ds.labels[:4].tolist() == [0, 1, 2, 0]
    assert ds[0].image.shape == (3, 36, 36) and ds[0].image.dtype == torch.uint8
    bad = ds[7]
    assert bad.image is None and bad.reason == "not a recognised image format" and bad.path.endswith("[7]")
    crops = build_dataset("hf", str(saved / layout), "train", 32, columns=("img", "cls"), cache_dir=str(tmp_path),
                          crop=RandomResizedCrop(32))
    loader = make_loader(crops, 8, seed=0, num_workers=2)
    set_epoch(loader, 0)
    batches = list(loader)
    assert sum(b["images"].shape[0] for b in batches) == N - 1 and batches[0]["images"].shape[1:] == (3, 32, 32)
    assert [p for b in batches for p, _ in b["skipped"]] == [bad.path]


def test_errors_name_the_column_and_the_split(saved, tmp_path):
    with pytest.raises(DataError, match=r"^data.image_column: .* has no column 'image' \(its columns: img, cls\)$"):
        build_dataset("hf", str(saved / "saved"), "train", 32, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"^data.root=.*: cannot load it with datasets \("):
        build_dataset("hf", str(tmp_path / "nothing-here"), "train", 32, cache_dir=str(tmp_path))


def test_pretraining_resumes_exactly_and_evaluates(saved, tmp_path):
    args = ["data.dataset=hf", f"data.root={saved / 'saved'}", "data.image_column=img", "data.label_column=cls",
            "data.num_workers=2", f"data.cache_dir={tmp_path / 'c'}", "model.preset=mae_vit_tiny_cifar_patch4",
            "model.depth=1", "model.decoder_depth=1", "train.batch_size=8", "train.epochs=3", "train.ckpt_every=2",
            "train.vis_images=2"]
    full = pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))
    assert full["step"] == 15 and full["skipped"] == [f"{saved / 'saved'}[7]"]
    interrupt_and_resume(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), 7)  # from step 6, mid-epoch
    equal_weights(tmp_path / "full", tmp_path / "cut", 15)
    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000015.pt")
    assert main(["eval", "knn", ckpt, f"out_dir={tmp_path / 'knn'}"]) == 0  # data section from the checkpoint
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["config"]["data"]["dataset"] == "hf"


def test_a_path_column_naming_a_fifo_is_a_counted_skip_not_a_hang(tmp_path):
    """Paths in a dataset can name anything: a FIFO would block the decoder forever."""
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "ok.jpg").write_bytes(_jpeg(1))
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=["a"])})
    rows = {"image": [str(fifo), str(tmp_path / "ok.jpg")], "label": [0, 0]}  # a column of paths
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    ds = build_dataset("hf", str(tmp_path / "saved"), "train", 32, load_size=32, cache_dir=str(tmp_path))
    assert ds[0].image is None and ds[0].reason == "not a regular file"
    assert ds[1].image.shape == (3, 32, 32)


def _paths(loader, epoch):
    set_epoch(loader, epoch)
    return [(b["labels"].tolist(), b["images"].sum().item(), [p for p, _ in b["skipped"]]) for b in loader]


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_a_stream_is_one_sequence_per_epoch_whatever_the_workers(saved, layout, tmp_path):
    def stream(**kw):
        return build_dataset("hf", str(saved / layout), "train", 32, load_size=36, columns=("img", "cls"),
                             cache_dir=str(tmp_path), streaming=True, shuffle_buffer=16, **kw)

    ds = stream()
    assert len(ds) == N and ds.classes == ["cat", "dog", "fox"]
    assert [s.label for s in ds.first(4)] == [0, 1, 2, 0] and ds.first(1)[0].image.shape == (3, 36, 36)
    one, two = make_loader(ds, 8, seed=3, num_workers=0), make_loader(ds, 8, seed=3, num_workers=2)
    epoch0 = _paths(one, 0)
    assert _paths(two, 0) == epoch0 and len(epoch0) == N // 8  # the same batches, in the same order
    assert sum(len(labels) for labels, _, _ in epoch0) == N - 1  # every row once; the bad one skipped
    assert [p for *_, skipped in epoch0 for p in skipped] != [] and _paths(one, 1) != epoch0  # reshuffled
    assert sorted(lab for labels, _, _ in epoch0 for lab in labels) == sorted(
        [i % 3 for i in range(N) if i != 7])
    # Two ranks share each epoch batch by batch: rank r takes the global batches b with b % 2 == r.
    ranks = [make_loader(ds, 8, seed=3, rank=r, world_size=2, num_workers=r) for r in (0, 1)]
    assert len(ranks[0].dataset) == 16  # 40 rows: two whole batches each, the fifth batch left out
    interleaved = [batch for pair in zip(_paths(ranks[0], 0), _paths(ranks[1], 0)) for batch in pair]
    assert interleaved == epoch0[:4]
    # Resuming mid-epoch skips whole batches and goes on with the same ones, with workers too.
    set_epoch(two, 0, start=16)
    assert [(b["labels"].tolist(), b["images"].sum().item(), [p for p, _ in b["skipped"]]) for b in two] == epoch0[2:]
    assert len(stream(limit=10)) == 10


def test_stream_errors_are_one_line(saved, tmp_path):
    root = tmp_path / "intlabels"
    datasets.Dataset.from_dict({"image": [{"bytes": _jpeg(0), "path": None}], "label": [3]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).save_to_disk(str(root))
    with pytest.raises(DataError, match=r"^data.label_column: 'label' of .* is not a ClassLabel, so a stream cannot"):
        build_dataset("hf", str(root), "train", 32, streaming=True)
    with pytest.raises(DataError, match=r"^data.image_column: .* has no column 'image' \(its columns: img, cls\)$"):
        build_dataset("hf", str(saved / "parquet"), "train", 32, streaming=True)
    with pytest.raises(ConfigError, match=r"^data.streaming: only for data.dataset=hf \(shards always stream\), got "
                                          r"folder$"):
        load_config(None, ["data.dataset=folder", "data.streaming=true"])


def test_streamed_pretraining_resumes_exactly_and_evaluates(saved, tmp_path):
    args = ["data.dataset=hf", "data.streaming=true", f"data.root={saved / 'parquet'}", "data.image_column=img",
            "data.label_column=cls", "data.num_workers=2", "data.shuffle_buffer=16",
            f"data.cache_dir={tmp_path / 'c'}", "model.preset=mae_vit_tiny_cifar_patch4", "model.depth=1",
            "model.decoder_depth=1", "train.batch_size=8", "train.epochs=3", "train.ckpt_every=2", "train.vis_images=2"]
    full = pretrain(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]))
    assert full["step"] == 15 and len(full["skipped"]) == 3  # the bad row, once per epoch (named by its place)
    interrupt_and_resume(load_config(None, [*args, f"out_dir={tmp_path / 'cut'}"]), 7)  # from step 6, mid-epoch
    equal_weights(tmp_path / "full", tmp_path / "cut", 15)
    ckpt = str(tmp_path / "full" / "checkpoints" / "checkpoint-00000015.pt")
    assert main(["eval", "knn", ckpt, "data.split=train", "val_split=train", f"out_dir={tmp_path / 'knn'}"]) == 0
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 0 <= result["top1"] <= 100 and result["config"]["data"]["streaming"] is True
